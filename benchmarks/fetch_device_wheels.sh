#!/usr/bin/env bash
# The wheels a device run needs that the GPU machine's image lacks, fetched into .whl/ (git-ignored) by the
# shared fetch script; carry ".whl" and begin the device command with `source .whl/install-wheels.sh`.
# The server's list is the one that worked on 2026-11-24 (run O13: fastapi 0.165 also imports
# opentelemetry-api and annotated-doc; llguidance for structured outputs); gemlite and torchao are the
# quantized engines'. From the repository root:
#
#     bash benchmarks/fetch_device_wheels.sh            # all of them
#     bash benchmarks/fetch_device_wheels.sh quant      # gemlite and torchao only
set -euo pipefail
FETCH=${FETCH:-../shared/device/fetch-wheels.sh}
QUANT=(gemlite==0.6.0 torchao==0.18.0)
SERVER=(fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 pydantic==2.13.4 pydantic_core==2.46.4
        annotated-types==0.7.0 annotated-doc==0.0.7 typing-inspection==0.4.2 anyio==4.16.0 sniffio==1.3.1
        opentelemetry-api==1.45.2 typing_extensions==4.16.0 llguidance==1.9.1)
case "${1:-all}" in
    quant) bash "$FETCH" "${QUANT[@]}" ;;
    server) bash "$FETCH" "${SERVER[@]}" ;;
    all) bash "$FETCH" "${QUANT[@]}" "${SERVER[@]}" ;;
    *) echo "usage: $0 [all|quant|server]" >&2; exit 2 ;;
esac
