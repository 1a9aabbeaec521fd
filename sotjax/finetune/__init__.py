"""SOT Stage 2: weighted LoRA fine-tuning of the flax.nnx Llama on a run's Top-K, and its exports.

Modules: :mod:`~sotjax.finetune.causal_lm` (the decoder plus its language-model head, loaded from
GGUF or safetensors), :mod:`~sotjax.finetune.lora` (adapters, frozen base, merge),
:mod:`~sotjax.finetune.loss` (Eq. 8), :mod:`~sotjax.finetune.data` (run ⋈ corpus, tokenisation,
bucketed deterministic batches), :mod:`~sotjax.finetune.trainer` (AdamW, accumulation,
checkpoints, resume), :mod:`~sotjax.finetune.export` (PEFT adapter, merged checkpoint, weighted rows)
and :mod:`~sotjax.finetune.outdir` (the fine-tune output directory and its marker).
Heavy imports stay inside the modules, so importing this package is cheap.
"""
