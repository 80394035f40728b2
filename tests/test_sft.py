"""Instruction tuning (task `sft`): loss masking, chat templates, packing without
cross-example attention, evaluation by generation, reload, merge and `peftkit generate`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.errors import PeftkitError
from peftkit.merge import merge_run
from peftkit.models import load_tokenizer, resolve_model
from peftkit.loading import load_run
from peftkit.tasks.sft import generate, gsm8k_answer, score_generations, set_chat_template, tokenize_conversation
from test_cli import assert_clean_failure, invoke

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QUESTIONS = [[{"role": "user", "content": "Is the sentiment of this movie review positive or negative? "
                                          "Answer with one word.\n\na gripping , funny film"}],
             [{"role": "user", "content": "what is kangen water?"}]]


def tiny_run(tmp_path, data_dir, strategy="lora", **extra):
    """tiny-llama (random weights, MiniLM's tokenizer, which has no chat template) on sst2-chat."""
    config = {"model": "tiny-llama", "task": "sst2-chat", "strategy": strategy, "data_dir": data_dir,
              "chat_template": CHATML, "max_train_samples": 48, "max_eval_samples": 12, "epochs": 1, "batch_size": 8,
              "max_new_tokens": 5, "output_dir": tmp_path / strategy.replace(":", "-"), **extra}
    return peftkit.train(config)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(resolve_model("smollm2-135m"))


@pytest.mark.real
def test_only_the_assistant_turns_carry_labels(smollm2_tokenizer):
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Hi again"}]
    ids, labels = tokenize_conversation(smollm2_tokenizer, messages, 512)
    assert len(ids) == len(labels)
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current) if current else None
    decoded = [smollm2_tokenizer.decode(span) for span in spans]
    # each answer and its end-of-turn mark (so the model learns to stop); never the system or user text
    assert decoded == ["Hi there<|im_end|>\n", "Hi again<|im_end|>\n"]


@pytest.mark.real
def test_truncation_keeps_the_labels_that_fit(smollm2_tokenizer):
    messages = [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "answer"}]
    ids, labels = tokenize_conversation(smollm2_tokenizer, messages, 16)
    assert len(ids) == 16 and all(label == -100 for label in labels)  # the answer fell off: prepare drops the row


def test_chat_template_is_required_and_can_be_given(tmp_path):
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))  # MiniLM's tokenizer: no chat template
    with pytest.raises(PeftkitError, match="has no chat template: pass one with --set chat_template"):
        set_chat_template(tokenizer, None)
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    set_chat_template(tokenizer, str(path))
    assert tokenizer.chat_template == CHATML
    with pytest.raises(PeftkitError, match="neither a readable file nor template text"):
        set_chat_template(tokenizer, str(tmp_path / "missing.jinja"))


def test_packing_never_attends_across_examples():
    """Per-example losses of a packed row (position ids restart, no attention mask: what TRL's
    padding-free collator builds) equal those of each example alone; with an all-ones mask
    (the mistake packing must avoid) they do not."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama").path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    examples = [torch.randint(5, 1000, (n,)).tolist() for n in (7, 11, 5)]
    labels = [[-100] * 3 + ids[3:] for ids in examples]

    def token_losses(logits, targets):
        return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(targets[1:]), reduction="none",
                                                 ignore_index=-100)

    with torch.no_grad():
        alone = [token_losses(model(input_ids=torch.tensor([ids])).logits[0], lab) for ids, lab in zip(examples, labels)]
        batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
            [{"input_ids": ids, "labels": lab} for ids, lab in zip(examples, labels)])
        assert "attention_mask" not in batch and batch["position_ids"].shape == (1, 23)
        # no cache, as in training (TRL passes use_cache=False): with one, transformers skips the packed-mask detection
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones(1, 23, dtype=torch.long)).logits[0]
    start = 0
    for ids, lab, expected in zip(examples, labels, alone):
        end = start + len(ids)
        torch.testing.assert_close(token_losses(packed[start:end], lab), expected, rtol=1e-5, atol=1e-5)
        if start > 0:
            assert not torch.allclose(token_losses(leaky[start:end], lab), expected, atol=1e-3)
        start = end


def test_fused_head_scores_only_answer_positions_with_the_same_loss_and_gradients(monkeypatch):
    """With score_answer_positions_only, TRL's fused LM head projects only the labelled
    positions through the vocabulary on CPU (3 of 2 x 12 here, not all 22), and the loss and
    every gradient equal those of scoring every position."""
    import trl.kernels.chunked_logprob as kernel
    import trl.trainer.utils as fused_head
    from trl.trainer.utils import add_fused_lm_head

    from peftkit.tasks.sft import score_answer_positions_only

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama").path, dtype=torch.float32)
    add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 10:], labels[1, 11] = ids[0, 10:], ids[1, 11]
    scored = []
    apply = kernel.ChunkedLogProbFunction.apply
    monkeypatch.setattr(fused_head._ChunkedLogProbFunction, "apply",
                        lambda hidden, *rest: scored.append(hidden.shape[0]) or apply(hidden, *rest))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    monkeypatch.setattr(fused_head, "_use_triton", kernel._use_triton)  # TRL's own (an earlier test may have run sft)
    every_loss, every_grads = loss_and_grads()
    score_answer_positions_only()
    answer_loss, answer_grads = loss_and_grads()
    assert scored == [22, 3]
    torch.testing.assert_close(answer_loss, every_loss, rtol=1e-6, atol=1e-6)
    for name, grad in every_grads.items():
        torch.testing.assert_close(answer_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_packed_training_runs_and_records(tmp_path, data_dir):
    result = tiny_run(tmp_path, data_dir, packing=True, max_generate_samples=0)
    assert result.record.config["packing"] is True
    assert set(result.metrics) == {"loss", "perplexity"}


def test_the_fullest_batch_holds_a_batch_worth_of_the_longest_answers():
    """Training: a batch's worth of the longest answers bounds any batch drawn at random.
    Evaluation: the fullest batch the evaluation loop really holds, in the split's order."""
    from peftkit.resolve import make_config
    from peftkit.tasks import resolve_task
    from peftkit.tasks.base import Prepared

    def split(answers: list[int], lengths: list[int]) -> dict:
        return {"labels": [[-100] + [7] * a for a in answers], "length": lengths}

    train = {"labels": [[-100, 1, 2], [-100, -100, 5], [1, 2, 3, 4], [-100, 7, 7]]}  # answers 2, 1, 4, 2
    task, _ = resolve_task("sst2-chat")

    def longest(evaluated: dict, **options) -> dict:
        config = make_config({"model": "tiny-llama", "task": "sst2-chat", "strategy": "lora", "batch_size": 2,
                              "eval_batch_size": 2, **options})
        return task.longest_answers(Prepared(splits={"train": train, "validation": evaluated}, raw={}), config)

    # in order: answers 3 + 1 and 1 + 3, not the two longest answers (3 + 3)
    assert longest(split([3, 1, 1, 3], [10, 9, 3, 2])) == {
        "longest_train_answer": 4, "longest_eval_answer": 3,
        "fullest_train_batch_answers": 4 + 2, "fullest_eval_batch_answers": 4}
    assert longest(split([3, 1, 3, 2], [10, 2, 9, 3]), packing=True)["fullest_eval_batch_answers"] == 3 + 2


def test_the_fullest_evaluation_batch_is_the_one_the_evaluation_loop_draws(tmp_path):
    """The estimate's evaluation LM-head term reads `fullest_eval_batch_answers`: it must be
    the fullest batch of SFTTrainer's own evaluation dataloader, whatever the length grouping of training."""
    from datasets import Dataset

    from peftkit.resolve import make_config
    from peftkit.tasks import resolve_task
    from peftkit.tasks.base import Prepared
    from peftkit.tasks.sft import _sft_trainer

    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, 40, (60,), generator=generator).tolist()
    answers = [int(torch.randint(1, n, (1,), generator=generator)) for n in lengths]
    rows = Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "length": lengths,
                              "labels": [[-100] * (n - a) + [5] * a for n, a in zip(lengths, answers)]})
    config = make_config({"model": "tiny-llama", "task": "sst2-chat", "strategy": "lora", "eval_batch_size": 8,
                          "seed": 3, "output_dir": str(tmp_path / "run")})
    tokenizer = load_tokenizer(resolve_model("tiny-llama"))
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama").path, dtype=torch.float32)
    trainer = _sft_trainer(model, config, tokenizer, str(tmp_path / "scratch"), train=rows, evaluation=rows)
    drawn = max(int((batch["labels"] != -100).sum()) for batch in trainer.get_eval_dataloader())
    task, _ = resolve_task("sst2-chat")
    recorded = task.longest_answers(Prepared(splits={"train": rows, "validation": rows}, raw={}), config)
    assert recorded["fullest_eval_batch_answers"] == drawn < sum(sorted(answers)[-8:])


def test_the_largest_generation_batch_is_the_one_with_the_largest_cache():
    from peftkit.tasks.sft import generation_batches, largest_generation_batch

    encoded = [[0] * n for n in (5, 30, 9, 7, 100)]  # by length: 5, 7, 9, 30, 100
    assert generation_batches(encoded, 2) == [[0, 3], [2, 1], [4]]
    # batches of 2 x 7, 2 x 30 and 1 x 100 prompt tokens: with 4 new, 2 x 34 < 1 x 104; with 60, 2 x 90 > 1 x 160
    assert largest_generation_batch([encoded], 2, 4) == {"rows": 1, "prompt_tokens": 100}
    assert largest_generation_batch([encoded], 2, 60) == {"rows": 2, "prompt_tokens": 30}
    assert largest_generation_batch([encoded, [[0] * 200]], 2, 60) == {"rows": 1, "prompt_tokens": 200}  # another split


def test_a_run_records_the_largest_batch_it_generates_in(tmp_path, data_dir, monkeypatch):
    """The estimate sizes generation's key/value cache by the record's `generation_batch`:
    it must be the largest batch `generate` really ran (12 validation prompts in batches of 5)."""
    from transformers import GenerationMixin

    shapes = []
    original = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    record = tiny_run(tmp_path, data_dir, eval_batch_size=5, select="last").record
    assert [rows for rows, _ in shapes] == [5, 5, 2]
    rows, prompt = max(shapes, key=lambda shape: shape[0] * (shape[1] + 5))
    assert record.data["generation_batch"] == {"rows": rows, "prompt_tokens": prompt}


def test_lora_run_trains_generates_and_saves_predictions(tmp_path, data_dir):
    result = tiny_run(tmp_path, data_dir)
    record = result.record
    assert record.task_kind == "sft"
    # the most labelled positions of an example, for the estimate's LM head term: the answer, not the prompt
    assert 0 < record.data["longest_train_answer"] < record.data["longest_train_example"]
    assert record.data["longest_train_answer"] <= record.data["fullest_train_batch_answers"] \
        <= 8 * record.data["longest_train_answer"]
    assert set(record.metrics) == {"loss", "perplexity", "exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu"}
    assert record.metrics["perplexity"] == pytest.approx(torch.tensor(record.metrics["loss"]).exp().item(), rel=1e-5)
    rows = [json.loads(line) for line in (result.output_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"prompt", "reference", "references", "generated", "finished"}
    assert rows[0]["reference"] in ("positive", "negative") and rows[0]["references"] == [rows[0]["reference"]]
    assert (result.output_dir / "adapter_config.json").is_file()
    assert (result.output_dir / "chat_template.jinja").read_text() == CHATML  # generate renders prompts the same way
    # the tied LM head is not trained as a copy: only LoRA matrices are in the adapter
    from safetensors.torch import load_file

    assert all("lora_" in name for name in load_file(str(result.output_dir / "adapter_model.safetensors")))


def test_untuned_model_is_recorded_with_strategy_none(tmp_path, data_dir):
    result = tiny_run(tmp_path, data_dir, strategy="none")
    assert result.record.trainable_params == 0 and result.record.train_time_s == 0
    assert result.record.samples_per_s is None
    assert (result.output_dir / "predictions.jsonl").is_file()


def texts(replies):
    return [reply.text for reply in replies]


@pytest.mark.slow
def test_reload_and_merge_generate_the_same_greedy_text(tmp_path, data_dir):
    run = tiny_run(tmp_path, data_dir, learning_rate=5e-2).output_dir  # a large step: the adapter changes answers
    _, model, tokenizer, _ = load_run(run)
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in predictions[:4]]
    reloaded = generate(model, tokenizer, conversations, 5, 2)
    assert texts(reloaded) == [p["generated"] for p in predictions[:4]]  # what the run wrote, from the reloaded adapter
    with model.disable_adapter():
        assert generate(model, tokenizer, conversations, 5, 2) != reloaded  # the adapter matters

    merge_run(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert generate(merged, tokenizer, conversations, 5, 2) == reloaded

    from peft import AutoPeftModelForCausalLM  # plain peft loads the adapter directory

    plain = AutoPeftModelForCausalLM.from_pretrained(run, dtype=torch.float32).eval()
    assert generate(plain, tokenizer, conversations, 5, 2) == reloaded


@pytest.mark.slow
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tmp_path, data_dir):
    run = tiny_run(tmp_path, data_dir, learning_rate=5e-2).output_dir
    _, model, tokenizer, _ = load_run(run)
    conversations = [*QUESTIONS, [{"role": "user", "content": "a much longer question " * 6}]]
    batched = generate(model, tokenizer, conversations, 6, 3)
    assert batched == [generate(model, tokenizer, [c], 6, 1)[0] for c in conversations]


@pytest.mark.slow
def test_generate_command(tmp_path, data_dir):
    run = tiny_run(tmp_path, data_dir).output_dir
    result = invoke("generate", "--run", run, "a gripping , funny film")
    assert result.exit_code == 0, result.output
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"messages": QUESTIONS[1]}) + "\n")
    result = invoke("generate", "--run", run, "--file", prompts)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "what is kangen water?"]


def test_generate_refuses_a_classification_run(tmp_path, data_dir):
    run = peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 16,
                         "max_eval_samples": 8, "epochs": 1, "strategy": "bitfit", "output_dir": tmp_path / "cls"}).output_dir
    result = invoke("generate", "--run", run, "hello")
    assert_clean_failure(result, "is a classification run, which does not generate text", tmp_path / "nothing")


def test_prompt_completion_layout_and_gsm8k_answers(tmp_path, jsonl):
    train = jsonl("train.jsonl", [{"q": "1+1?", "a": "2 #### 2"}, {"q": "2+2?", "a": "#### 4"}])
    result = peftkit.train({"model": "tiny-llama", "task": "sft", "train_file": train, "validation_file": train,
                            "prompt_column": "q", "completion_column": "a", "chat_template": CHATML, "epochs": 1,
                            "select": "last",  # two examples: none to spare for a selection slice
                            "strategy": "lora", "max_new_tokens": 3, "output_dir": tmp_path / "run"})
    assert result.record.data["columns"] == {"prompt": "q", "completion": "a"}
    assert gsm8k_answer("so 3 + 4 = 7.\n#### 1,234") == "1234"
    assert gsm8k_answer("the answer is 12.") == "12"
    scores = score_generations(["#### 7", "it is 8"], [["x #### 7"], ["#### 9"]], "gsm8k")
    assert scores["exact_match"] == 0.5


def test_exact_match_is_normalized_and_rouge_l_from_rouge_score():
    scores = score_generations(["Positive.", "the cat sat"], [["positive"], ["a cat sat down"]])
    assert scores["exact_match"] == 0.5
    # "cat sat" is the longest common subsequence: precision 2/3, recall 2/4, F1 4/7
    assert scores["rouge_l"] == pytest.approx((1.0 + 4 / 7) / 2)


@pytest.mark.parametrize("rows,message", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "last message must be the assistant's answer"),
    ([{"messages": "hi"}], "messages must be a non-empty list"),
    ([{"text": "hi"}], "cannot tell the chat layout"),
])
def test_bad_chat_data_is_one_line(tmp_path, jsonl, rows, message):
    path = jsonl("bad.jsonl", rows)
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-llama", "--task", "sft", "--train-file", path, "--validation-file", path,
                    "--set", f"chat_template={CHATML}", "--output-dir", out)
    assert_clean_failure(result, message, out)


def test_packing_with_prompt_learning_is_refused(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--model", "tiny-llama", "--task", "sst2-chat", "--strategy", "prompt-tuning",
                    "--set", "packing=true", "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "drop packing for prompt learning", out)


@pytest.mark.real
def test_smollm2_lora_instruction_tuning(tmp_path, data_dir):
    """The packaged SmolLM2-135M-Instruct, its own chat template, a few real sst2-chat steps."""
    result = peftkit.train({"model": "smollm2-135m", "task": "sst2-chat", "strategy": "lora", "data_dir": data_dir,
                            "max_train_samples": 32, "max_eval_samples": 16, "epochs": 1, "batch_size": 8,
                            "learning_rate": 5e-4, "max_new_tokens": 3, "output_dir": tmp_path / "run"})
    history = result.record.eval_history  # the selection slice: 4 of the 32 training examples
    assert result.record.total_params > 130_000_000
    assert result.record.data["selection_examples"] == 4
    # "positive" or "negative", then <|im_end|> and the newline: 3 labelled tokens, all the LM head scores
    assert result.record.data["longest_train_answer"] == result.record.data["longest_eval_answer"] == 3
    assert 0 <= result.metrics["exact_match"] <= 1 and result.metrics["perplexity"] < 20
    assert len(history) == 1 and history[0]["loss"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["full", "partial", "dora", "qlora", "ia3", "adapter", "prompt-tuning",
                                      "prefix-tuning", "p-tuning", "peft:loha"])
def test_every_strategy_that_means_something_trains_a_causal_lm(tmp_path, data_dir, strategy):
    result = tiny_run(tmp_path, data_dir, strategy, max_train_samples=20, max_eval_samples=4, max_new_tokens=2)
    assert result.record.trainable_params > 0 and set(result.metrics) == {"loss", "perplexity", "exact_match", "rouge_1", "rouge_2", "rouge_l", "bleu"}
    _, model, tokenizer, _ = load_run(result.output_dir)
    rows = [json.loads(line) for line in (result.output_dir / "predictions.jsonl").read_text().splitlines()]
    again = generate(model, tokenizer, [[{"role": "user", "content": r["prompt"]}] for r in rows], 2, 4)
    assert texts(again) == [r["generated"] for r in rows]  # the saved run generates what the run itself did


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["lora", "adapter"])
def test_bf16_sft_run_trains_generates_and_reloads(tmp_path, data_dir, strategy):
    """An instruction-tuning run on a bf16 base under bf16 autocast (CPU): the LoRA weights
    train in fp32, the base stays bf16, and the saved run regenerates the run's own greedy text,
    through `peftkit generate` and through `generate` under the run's autocast (fp32 adapter
    layers meet bf16 hidden states)."""
    from peftkit.inference import generate_answers
    from peftkit.trainer import autocast_for

    result = tiny_run(tmp_path, data_dir, strategy, dtype="bf16")
    config, model, tokenizer, _ = load_run(result.output_dir)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    if strategy == "lora":
        assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
        assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    rows = [json.loads(line) for line in (result.output_dir / "predictions.jsonl").read_text().splitlines()]
    conversations = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    assert texts(generate_answers(result.output_dir, conversations)[0]) == [r["generated"] for r in rows]
    with autocast_for(config):
        assert texts(generate(model, tokenizer, conversations, 5, len(conversations))) == [r["generated"] for r in rows]


@pytest.mark.slow
def test_truncated_and_dropped_examples_are_recorded(tmp_path, data_dir):
    """At max_length 56 many sst2-chat conversations (48-82 tokens here) run over:
    each split counts its cut examples, and training examples cut before their answer are dropped."""
    record = tiny_run(tmp_path, data_dir, max_length=56).record.data
    assert record["truncated_examples"]["train"] > 0 and record["truncated_examples"]["validation"] > 0
    assert record["dropped_train_examples"] > 0
    assert record["train_examples"] + record["selection_examples"] + record["dropped_train_examples"] == 48
    assert tiny_run(tmp_path / "long", data_dir, max_length=512).record.data["truncated_examples"] == {
        "train": 0, "selection": 0, "validation": 0}


def test_generations_cut_at_max_new_tokens_are_counted_and_said(tmp_path, data_dir, capsys):
    """A random model asked for one token never ends its answer: every generation is counted as
    cut (run.json's `generation`, `finished` per answer) and the run and `generate` say so."""
    from test_cli import invoke

    result = tiny_run(tmp_path, data_dir, max_train_samples=16, max_eval_samples=6, max_new_tokens=1)
    assert result.record.generation.model_dump() == {"generated": 6, "cut_at_max_new_tokens": 6, "max_new_tokens": 1}
    rows = [json.loads(line) for line in (result.output_dir / "predictions.jsonl").read_text().splitlines()]
    assert [row["finished"] for row in rows] == [False] * 6
    assert "note: 6 of 6 validation generations stopped at max_new_tokens=1" in capsys.readouterr().out
    said = invoke("generate", "--run", result.output_dir, "--max-new-tokens", "1", "is this good?", "or bad?")
    assert said.exit_code == 0 and "note: 2 of 2 answers stopped at --max-new-tokens 1" in said.stderr
