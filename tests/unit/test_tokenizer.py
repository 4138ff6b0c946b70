from transformers import AutoTokenizer

from rlhf.models.tokenizer import EOS, PAD, train_bpe_tokenizer

CORPUS = ["User: What is 2 plus 3?\nAssistant: 2 plus 3 is 5."] * 50 + [
    "User: Hello!\nAssistant: Hello! How can I help?"
] * 50


def test_bpe_has_distinct_pad_and_eos_and_round_trips(tmp_path) -> None:
    tok = train_bpe_tokenizer(CORPUS, vocab_size=300)
    assert tok.eos_token == EOS and tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id
    text = "User: What is 7 plus 1?\nAssistant: ünïcode 🙂"
    assert (
        tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    )  # byte-level: nothing is unknown
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token_id == tok.eos_token_id


def test_chat_template_renders_the_demo_dialogue_format() -> None:
    tok = train_bpe_tokenizer(CORPUS, vocab_size=300)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hello!"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "User: Hello!\nAssistant:"
    full = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=False
    )
    assert full == f"User: Hi\nAssistant: Hello!{EOS}\n"
