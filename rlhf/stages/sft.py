"""`rlhf sft`: supervised fine-tuning on prompt -> response demonstrations.

Rows are TRL's prompt-completion `{prompt, completion}` (or `{prompt, response}`), conversational
`{prompt: [...], completion: [...]}` or `{messages: [...]}` (rendered with the tokenizer's chat template; the
assistant's reply is the response, up to and including the template's end-of-turn token), or plain `{text}` (all
response); `sft.columns` renames other columns to these ({prompt: instruction, completion: output}). Loss falls
on response tokens only, each response ends with EOS or the end-of-turn token, padding is masked; the prompt
carries the tokenizer's BOS once (rlhf.models.tokens, rlhf.train.demonstrations). The loop is the shared LM loop;
after it, a few held-out prompts are answered by sampling, to show whether the model ends its answers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from rlhf.config import SFTConfig
from rlhf.data.jsonl import write_json, write_jsonl
from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.errors import DataError
from rlhf.models.loading import context_length, load_causal_lm, load_tokenizer
from rlhf.models.lora import trainable_causal_lm
from rlhf.models.tokens import encode_prompts, stop_ids
from rlhf.runs import Run, seed_everything
from rlhf.train.common import make_accelerator
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.lm_loop import fit

log = logging.getLogger(__name__)


def run(cfg: SFTConfig, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    accelerator = make_accelerator(cfg.precision, cfg.log_with, cfg.out_dir)
    seed_everything(cfg.seed + accelerator.process_index)
    tokenizer = load_tokenizer(cfg.model, cfg.add_pad_token)
    # read before any output: bad input leaves nothing behind
    rows = read_demonstrations(cfg.train_file, tokenizer, cfg.columns)
    held_rows = read_demonstrations(cfg.eval_file, tokenizer, cfg.columns) if cfg.eval_file else []
    if not cfg.eval_file and cfg.eval_fraction > 0 and len(rows) > 1:  # a single demonstration trains
        n_eval = max(1, int(len(rows) * cfg.eval_fraction))
        rows, held_rows = rows[n_eval:], rows[:n_eval]
    run_dir = Run(cfg.out_dir, cfg, accelerator.is_main_process, accelerator, resume=resume)
    checkpoint = run_dir.latest_checkpoint() if resume else None
    model = trainable_causal_lm(cfg.model, checkpoint, cfg.lora, tokenizer)
    max_len = cfg.max_seq_len
    if max_len > context_length(model):
        log.warning(
            "sft.max_seq_len %d exceeds the model's context; using %d", max_len, context_length(model)
        )
        max_len = context_length(model)
    train, truncated, dropped = tokenize_demonstrations(rows, tokenizer, max_len)
    held_out, held_truncated, held_dropped = tokenize_demonstrations(held_rows, tokenizer, max_len)
    if truncated:
        log.warning("sft: %d of %d demonstrations are longer than %d tokens: %d cut at the end of their response, "
                    "%d dropped (their prompt alone fills the context)", truncated, len(rows), max_len,
                    truncated - dropped, dropped)  # fmt: skip
    if held_truncated:
        log.warning("sft: %d of %d held-out demonstrations are longer than %d tokens: %d cut at the end of their "
                    "response, %d dropped (their prompt alone fills the context)", held_truncated, len(held_rows),
                    max_len, held_truncated - held_dropped, held_dropped)  # fmt: skip
    if not train:
        raise DataError(f"{cfg.train_file}: no demonstration fits in {max_len} tokens")
    result = fit(stage="sft", model=model, tokenizer=tokenizer, train=train, held_out=held_out, cfg=cfg,
                 accelerator=accelerator, run=run_dir, checkpoint=checkpoint, quiet=quiet, pack=cfg.pack_sequences,
                 rebuild=lambda: trainable_causal_lm(cfg.model, None, cfg.lora, tokenizer))  # fmt: skip

    # Sample answers to held-out prompts: does the model end its answers with EOS?
    prompts = [p for p, _ in held_rows if p][:64]  # `text` rows have no prompt to answer
    if accelerator.is_main_process and prompts:
        final = load_causal_lm(str(run_dir.dir / "final")).to(accelerator.device)
        final.eval()
        ids = encode_prompts(tokenizer, prompts)
        longest = min(48, context_length(final) // 2)  # room for the prompt in a short context
        gen = generate(final, ids, SamplingParams(longest, temperature=0.7, top_p=0.95, seed=cfg.seed),
                       stop_ids(tokenizer), tokenizer.pad_token_id)  # fmt: skip
        texts = decode_responses(tokenizer, gen)
        write_jsonl(run_dir.dir / "samples.jsonl",
                    [{"prompt": p, "response": t, "ended": bool(e)} for p, t, e in zip(prompts, texts, gen.ended.tolist(), strict=True)])  # fmt: skip
        result["sample_eos_rate"] = float(gen.ended.float().mean())
        summary = json.loads((run_dir.dir / "summary.json").read_text())
        write_json(run_dir.dir / "summary.json", {**summary, "sample_eos_rate": result["sample_eos_rate"]})
    return result
