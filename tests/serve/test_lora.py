"""A LoRA adapter directory is served merged onto its base: the same greedy text as the merged model."""

from __future__ import annotations

from pathlib import Path

import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel, get_peft_model

from rlhf.engine.decoding import SamplingParams, decode_responses, generate
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.serve.main import create_app
from rlhf.serve.settings import Settings

PROMPT = "User: What is 2 plus 3?\nAssistant:"


def _greedy(model: torch.nn.Module, tokenizer, n: int = 10) -> str:  # type: ignore[no-untyped-def]
    ids = [tokenizer(PROMPT)["input_ids"]]
    gen = generate(
        model, ids, SamplingParams(n, temperature=0), tokenizer.eos_token_id, tokenizer.pad_token_id
    )  # type: ignore[arg-type]
    return decode_responses(tokenizer, gen)[0]


def test_lora_adapter_is_served_merged(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    base_dir = str(model_dirs["policy"])
    tokenizer = load_tokenizer(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)  # LoRA's A is drawn from the global generator: the same adapter every run
        peft_model = get_peft_model(load_causal_lm(base_dir), config)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero (a no-op adapter); give it weights that matter
                p.normal_(0, 1.0)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged = PeftModel.from_pretrained(load_causal_lm(base_dir), adapter_dir).merge_and_unload()
    expected = _greedy(merged, tokenizer)
    assert expected != _greedy(load_causal_lm(base_dir), tokenizer)

    settings = Settings(model_dir=str(adapter_dir), model_name="tiny-lora")
    with TestClient(create_app(settings)) as http:
        r = http.post(
            "/v1/completions",
            json={"model": "tiny-lora", "prompt": PROMPT, "max_tokens": 10, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        assert http.get("/v1/models").json()["data"][0]["version"].startswith("tiny-lora@")


def test_an_adapter_naming_its_base_by_a_path_not_found_here_says_so(
    model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """PEFT writes the base model's path as training was given it: from another directory a relative one is
    not there, which the error traces to adapter_config.json rather than naming a directory out of nowhere."""
    import json

    import pytest

    from rlhf.errors import RlhfError
    from rlhf.serve.policy import load_model

    adapter_dir = tmp_path / "adapter"
    get_peft_model(
        load_causal_lm(str(model_dirs["policy"])), LoraConfig(r=2, target_modules=["q_proj"])
    ).save_pretrained(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    config.write_text(
        json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": "runs/f/ppo/final"})
    )
    with pytest.raises(
        RlhfError,
        match=r"adapter_config.json: base_model_name_or_path 'runs/f/ppo/final' is not a directory from here",
    ):
        load_model(str(adapter_dir), torch.float32)
