"""Train the project's small Llama on the standard library's source, then measure each quantized format on it.

    python benchmarks/llm/train_small_llama.py --seconds 120

Text: every `.py` file of the running Python's standard library (tests excluded); files whose path hashes to 0
mod 20 are held out. A byte-level BPE (8,192 tokens) is trained on the training files, then a ~30M-parameter
Llama (GQA, tied embeddings) for a fixed wall-clock budget. The model is saved in Hugging Face format
(safetensors) under /tmp/inferforge_small_llama; the script then reports, for bf16/int8/fp8/int4 through the
inferforge model code, held-out perplexity and greedy agreement with bf16, and bf16 greedy agreement with
transformers in fp32. Writes small_llama_quality.json under $OUT.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import free, write_json

from inferforge.llm.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

SAVE = Path("/tmp/inferforge_small_llama")
SEQ = 512


def corpus() -> tuple[list[str], list[str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for p in sorted(root.rglob("*.py")):
        rel = str(p.relative_to(root))
        if "test" in rel.split("/")[0] or "site-packages" in rel or "idlelib" in rel:
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0 else train).append(text)
    return train, held


def tokenizer(train: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0],
        "eos_token": SPECIAL_TOKENS[0],
        "pad_token": SPECIAL_TOKENS[0],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(0)
    return torch.tensor(ids, dtype=torch.long)


def train(data: torch.Tensor, seconds: float, vocab: int, epochs: float) -> tuple[object, dict]:
    """AdamW with warm-up and cosine decay over `epochs` passes of the text (or `seconds`, if shorter).
    The standard library is ~4M tokens: past ~3 epochs a 30M model memorises it (held-out perplexity rose
    from 24 to 62 between 0.4 and 12 epochs on the H100), so the budget is counted in epochs."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1536,
        vocab_size=vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    data = data.cuda()
    batch, steps, losses = 64, 0, []
    total = max(1, int(epochs * data.numel() / (batch * SEQ)))
    t0 = time.perf_counter()
    while steps < total and time.perf_counter() - t0 < seconds:
        frac = steps / total
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1.0, steps / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, data.numel() - SEQ - 1, (batch,), device="cuda")
        x = torch.stack([data[s : s + SEQ] for s in starts.tolist()])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if steps % 100 == 0:
            losses.append(round(loss.item(), 3))
    info = {
        "params": n_params,
        "steps": steps,
        "tokens_seen": steps * batch * SEQ,
        "loss_every_100": losses,
        "train_seconds": time.perf_counter() - t0,
        "epochs": steps * batch * SEQ / data.numel(),
    }
    return model, info


@torch.inference_mode()
def perplexity(model, data: torch.Tensor, windows: int = 64) -> float:
    """Mean NLL over non-overlapping 512-token windows of held-out text, via the inferforge model's
    prefill."""
    from inferforge.llm.attention import AttnMeta, PrefillSeq
    from inferforge.llm.kv_cache import attach_cache, plan_cache

    dev, dtype = model.embed.weight.device, model.embed.weight.dtype
    attach_cache(model, plan_cache(model, dtype, tokens=SEQ, memory_fraction=1.0, device=dev), dev)
    blocks = torch.arange(1, SEQ // 16 + 1, device=dev)
    slots = torch.arange(16, 16 + SEQ, device=dev)
    nll, count = 0.0, 0
    for w in range(windows):
        x = data[w * SEQ : (w + 1) * SEQ].to(dev)
        meta = AttnMeta(slot_mapping=slots, prefill=[PrefillSeq(0, SEQ, SEQ, blocks)])
        logits = model.logits(model(x, torch.arange(SEQ, device=dev), meta))
        nll += F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
        count += SEQ - 1
    return math.exp(nll / count)


def greedy(folder: Path, quant: str | None, prompts: list[tuple[int, ...]], n: int = 64) -> list[list[int]]:
    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    eng = LLMEngine(
        folder,
        EngineConfig(
            device="cuda",
            quant=quant,
            max_num_seqs=16,
            kv_cache_tokens=16 * 160,
            max_model_len=256,
            decode_buckets=(16,),
            experimental_quant=True,
        ),
    )
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    res = eng.generate([EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
    out = [[t for o in res[str(i)][0] for t in o.new_token_ids] for i in range(len(prompts))]
    del eng
    free()
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where two greedy continuations agree, up to and including the first divergence."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        k = next((i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v), len(x))
        same += k
        total += len(x)
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--formats", default="bf16,int8,fp8,int4", help="also int4-g128, int4-head8, int4-hqq")
    args = ap.parse_args()
    from inferforge.llm.quant import quantize_model
    from inferforge.llm.weights import load_model

    t0 = time.perf_counter()
    train_txt, held_txt = corpus()
    tok = tokenizer(train_txt, SAVE)
    data, held = encode(tok, train_txt), encode(tok, held_txt)
    result: dict = {
        "train_tokens": data.numel(),
        "heldout_tokens": held.numel(),
        "prep_s": time.perf_counter() - t0,
    }
    model, info = train(data, args.seconds, tok.get_vocab_size(), args.epochs)
    result.update(info)
    model.to(torch.bfloat16).save_pretrained(SAVE, safe_serialization=True)
    del model
    free()
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, held.numel() - 64, (16,), generator=g).tolist()
    prompts = [tuple(held[s : s + 32].tolist()) for s in starts]
    base = None
    print(
        f"trained {info['params'] / 1e6:.1f}M params, {info['steps']} steps, losses {info['loss_every_100']}",
        flush=True,
    )
    if args.formats != "bf16":
        import gemlite

        # One default kernel config per shape instead of autotuning each new batch size (minutes of
        # compiles on this small model); quality does not depend on the tile sizes.
        gemlite.set_autotune("default")
    from inferforge.llm import quant as quant_mod

    default_recipe = dict(quant_mod.INT4_RECIPE)
    for fmt in args.formats.split(","):
        quant = None if fmt == "bf16" else fmt.split("-")[0]
        # int4 variants: "int4-g128" (groups of 128), "int4-head8" (the LM head in int8), "int4-hqq"
        quant_mod.INT4_RECIPE.update(default_recipe)
        if fmt == "int4-g128":
            quant_mod.INT4_RECIPE["group"] = 128
        elif fmt == "int4-head8":
            quant_mod.INT4_RECIPE["lm_head"] = "int8"
        elif fmt == "int4-hqq":  # zero points by half-quadratic optimization (`quant._hqq_zero`)
            quant_mod.INT4_RECIPE["method"] = "hqq"
        elif quant not in (None, "int8", "fp8", "int4") or (quant == "int4" and fmt != "int4"):
            raise SystemExit(f"--formats: unknown format {fmt!r}")
        t_fmt = time.perf_counter()
        m = load_model(
            SAVE,
            device="cuda",
            dtype=torch.bfloat16,
            max_model_len=SEQ,
            transform=(lambda mod, q=quant: quantize_model(mod, q, experimental=True)) if quant else None,
        )
        ppl = perplexity(m, held)
        del m
        free()
        out = greedy(SAVE, quant, prompts)
        base = base or out
        result[fmt] = {"heldout_ppl": ppl, "greedy_agreement_with_bf16": agreement(out, base)}
        print(
            f"{fmt:5s} held-out perplexity {ppl:8.3f}   "
            f"greedy agreement with bf16 {agreement(out, base):.3f}   ({time.perf_counter() - t_fmt:.0f} s)",
            flush=True,
        )
        write_json("small_llama_quality.json", result)
    quant_mod.INT4_RECIPE.update(default_recipe)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(SAVE, dtype=torch.float32).cuda().eval()
    refs = [
        hf.generate(
            torch.tensor([p], device="cuda"),
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    result["bf16_engine_vs_hf_fp32_agreement"] = agreement(base, refs)
    print(
        "bf16 engine greedy agreement with transformers fp32: "
        f"{result['bf16_engine_vs_hf_fp32_agreement']:.3f}"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "loss_every_100"}, default=str))
    write_json("small_llama_quality.json", result)


if __name__ == "__main__":
    main()
