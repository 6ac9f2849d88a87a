"""TRL's dataset formats: ``plop.diagnose`` and ``plop.lora_config`` read them, a real TRL
``SFTTrainer`` trains on ``peft_config=plop.lora_config(model, ds)`` and adapts exactly the
recommended modules, and the scored tokens are the ones TRL's own rendering puts in the completion.

The tiny model's tokenizer has one token per character, so token counts are character counts
(plus one BOS per tokenized piece) and can be written down from the strings.
"""

from __future__ import annotations

import pytest
import torch

import plop
from plop.errors import DataError, FieldTypeError
from plop.files.trl_formats import dataset_examples
from tiny_lm import make_chat_tokenizer, make_tokenizer, save_tiny

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

PAIRS = [(f"What is {a} plus {b}?", f"It is {a + b}.") for a in range(4) for b in range(4)]


def _rows(fmt: str) -> list[dict]:
    """16 rows of ``fmt``: the same question/answer pairs in each of TRL's shapes."""
    def user(q):
        return [{"role": "user", "content": q}]

    def bot(a):
        return [{"role": "assistant", "content": a}]

    return [{
        "text": {"text": f"Q: {q} A: {a}"},
        "prompt_completion": {"prompt": f"Q: {q} A:", "completion": f" {a}"},
        "messages": {"messages": user(q) + bot(a)},
        "chat_prompt_completion": {"prompt": user(q), "completion": bot(a)},
        "preference": {"prompt": f"Q: {q} A:", "chosen": f" {a}", "rejected": " No idea."},
        "implicit_preference": {"chosen": f"Q: {q} A: {a}", "rejected": f"Q: {q} A: No idea."},
        "chat_preference": {"prompt": user(q), "chosen": bot(a), "rejected": bot("No idea.")},
    }[fmt] for q, a in PAIRS]


SFT_FORMATS = ["text", "prompt_completion", "messages", "chat_prompt_completion"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA saved with a chat-template tokenizer, so that ``lora_config(model, ds)`` and
    ``SFTTrainer`` both find the tokenizer from the model's path, as with a hub model."""
    path = save_tiny(tmp_path_factory.mktemp("tiny"))
    make_chat_tokenizer().save_pretrained(path)
    return path


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _adapted(model) -> set[str]:
    """Names (in the base model) of the modules the wrapped model holds a LoRA adapter on."""
    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("fmt", SFT_FORMATS)
def test_sft_trainer_trains_exactly_the_recommended_modules(fmt, model_dir, tmp_path):
    model = _model(model_dir)
    ds = datasets.Dataset.from_list(_rows(fmt))
    report = plop.diagnose(model, ds, n_bootstrap=20)
    peft_config = plop.lora_config(model, ds, n_bootstrap=20, r=4)
    assert sorted(peft_config.target_modules) == sorted(report.recommendation.target_modules)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=64)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=ds, peft_config=peft_config)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert _adapted(trainer.model) == set(report.recommendation.modules)
    assert len(report.recommendation.modules) == 6  # 3 of the 7 types, in both layers: a real choice
    moved = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(before)  # every adapter trained
    assert report.data["format"] == {"trl": fmt.removeprefix("chat_")}


def _trl_completion(tokenizer, row: dict) -> str:
    """The completion as TRL's own ``apply_chat_template`` renders it."""
    from trl.data_utils import apply_chat_template, maybe_extract_prompt

    return apply_chat_template(maybe_extract_prompt(row), tokenizer)["completion" if "completion" in row else "chosen"]


@pytest.mark.parametrize("fmt, response_chars", [
    ("text", lambda row, tok: len(row["text"]) + 1),  # all of it, with its BOS
    ("prompt_completion", lambda row, tok: len(row["completion"])),
    ("preference", lambda row, tok: len(row["chosen"])),
    ("implicit_preference", lambda row, tok: len(row["chosen"]) - len(row["chosen"].rsplit(" A:", 1)[0] + " A:")),
    ("chat_prompt_completion", lambda row, tok: len(_trl_completion(tok, row))),
    ("chat_preference", lambda row, tok: len(_trl_completion(tok, row))),
])
def test_response_scope_scores_the_completion(fmt, response_chars, model_dir):
    """``tokens="response"`` scores as many tokens as TRL's completion has characters, and prompt
    and response scopes add up to the whole, on every format."""
    model, tokenizer = _model(model_dir), make_chat_tokenizer()
    rows = _rows(fmt)
    scopes = ("all", "response") if fmt == "text" else ("all", "prompt", "response")
    counts = {scope: plop.diagnose(model, rows, tokenizer, tokens=scope, n_bootstrap=10).data["token_count"]
              for scope in scopes}
    assert counts["response"] == sum(response_chars(row, tokenizer) for row in rows)
    assert counts.get("prompt", 0) + counts["response"] == counts["all"]
    if fmt == "text":  # language modeling has no prompt: that scope would score nothing
        with pytest.raises(DataError, match="tokens='prompt' scores nothing: rows in the 'text' format"):
            plop.diagnose(model, rows, tokenizer, tokens="prompt")


def test_messages_split_before_the_last_assistant_turn(model_dir):
    tokenizer = make_chat_tokenizer()
    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4"}]}
    (example,), info = dataset_examples([row], tokenizer)
    assert example.prompt == "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>Hello\n<|user|>2+2?\n<|assistant|>"
    assert example.response == "4\n"
    assert info["format"] == {"trl": "messages"} and info["source"] == "list of dicts"


def test_preference_goes_through_the_same_helper(model_dir):
    """A DPO-style set gives the LoraConfig of its prompts and chosen answers: the one the same
    rows give as prompt-completion, and not the one of the rejected answers."""
    model = _model(model_dir)
    preference = datasets.Dataset.from_list(_rows("preference"))
    as_completion = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in _rows("preference")]
    config = plop.lora_config(model, preference, n_bootstrap=20, tokens="response")
    report = plop.diagnose(model, as_completion, n_bootstrap=20, tokens="response")
    assert sorted(config.target_modules) == sorted(report.recommendation.target_modules)
    chosen = plop.diagnose(model, preference, n_bootstrap=20, tokens="response")
    assert [m.nfn for m in chosen.modules] == [m.nfn for m in report.modules]


@pytest.mark.parametrize("fmt", ["preference", "chat_preference"])
def test_dpo_trainer_trains_exactly_the_recommended_modules(fmt, model_dir, tmp_path):
    """The preference set's LoraConfig in TRL's own preference trainer, two steps."""
    model = _model(model_dir)
    ds = datasets.Dataset.from_list(_rows(fmt))
    report = plop.diagnose(model, ds, n_bootstrap=20)
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                         save_strategy="no", report_to=[], use_cpu=True, max_length=64)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds,
                             peft_config=plop.lora_config(model, ds, n_bootstrap=20, r=4))
    assert trainer.train().global_step == 2
    assert _adapted(trainer.model) == set(report.recommendation.modules)


@pytest.mark.heavy
def test_streams_budgets_allocation_and_lora_settings(model_dir):
    model = _model(model_dir)
    stream = datasets.Dataset.from_list(_rows("text") * 4).to_iterable_dataset()
    report = plop.diagnose(model, stream, samples=24, n_bootstrap=10)
    assert report.data["samples"] == 24 and report.data["source"] == "IterableDataset"
    config = plop.lora_config(model, stream, samples=24, allocate=True, r=8, lora_alpha=32, lora_dropout=0.1)
    assert config.r == 8 and config.lora_dropout == 0.1
    assert config.rank_pattern and all(config.alpha_pattern[t] == 4 * r for t, r in config.rank_pattern.items())
    budget = plop.lora_config(model, stream, samples=24, budget=1000, r=4)
    spent = plop.diagnose(model, stream, samples=24, strategy="budget", budget=1000, rank=4)
    assert sorted(budget.target_modules) == sorted(spent.recommendation.target_modules)
    whole = plop.lora_config(model, stream, samples=24, strategy=plop.Strategy("budget", budget=1000), r=4)
    assert sorted(whole.target_modules) == sorted(budget.target_modules)  # the strategy as one value, too
    assert 0 < spent.recommendation.trainable_params <= 1000 < spent.costs["all-linear"]["trainable_params"]
    sampled = plop.diagnose(model, datasets.Dataset.from_list(_rows("text")), samples=5, seed=3, n_bootstrap=10)
    assert len(sampled.data["indices"]) == 5 and sampled.data["indices"] != [0, 1, 2, 3, 4]


def test_data_in_no_format_gets_one_line_naming_its_fields(model_dir):
    model = _model(model_dir)
    ds = datasets.Dataset.from_list([{"question": "q", "answer_text": "a"}] * 4)
    with pytest.raises(DataError, match=r"^the dataset is in none of TRL's formats plop reads: its fields are "
                                        r"answer_text, question \(plop reads language modeling \(text, or "
                                        r"messages\); prompt-completion .*; preference .*\)$") as raised:
        plop.lora_config(model, ds)
    assert "\n" not in str(raised.value)
    with pytest.raises(FieldTypeError, match="row 0: field 'completion' holds dict"):
        plop.diagnose(model, [{"prompt": "q", "completion": {"a": 1}}])
    with pytest.raises(DataError, match="chat template"):
        plop.diagnose(model, _rows("messages"), make_tokenizer())
