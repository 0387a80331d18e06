"""Built-in examples: real models on real data that ship with the install, so `inferforge optimize` runs
offline."""
