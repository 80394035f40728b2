"""Summarization and translation: ROUGE-1/2/L and BLEU by hand, against several references;
an encoder-decoder (tiny T5) trained end to end (loss falls, generations scored and saved,
lora and prompt tuning apply, reload gives the same scores); SciTLDR through instruction
tuning with its summary prompt and every reference."""

from __future__ import annotations

import json

import pytest
import sacrebleu

from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.inference import evaluate_run, generate_answers, predict
from peftkit.run import train
from peftkit.tasks import resolve_task
from peftkit.text_metrics import bleu_score, rouge_scores


def test_rouge_by_hand_takes_the_best_reference():
    scores = rouge_scores(["the cat sat"], [["a dog ran", "the cat sat down"]])
    # against "the cat sat down": unigrams 3/3 and 3/4 -> 6/7; bigrams 2/2 and 2/3 -> 4/5; LCS 3 -> 6/7
    assert scores == {"rouge_1": pytest.approx(6 / 7), "rouge_2": pytest.approx(4 / 5), "rouge_l": pytest.approx(6 / 7)}


def test_bleu_reads_several_references_as_streams():
    assert bleu_score(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    predictions = ["the cat sat on the mat", "a quick brown fox jumps"]
    references = [["the cat is on the mat"], ["a fast brown fox jumps", "the quick brown fox jumped"]]
    expected = sacrebleu.corpus_bleu(predictions, [["the cat is on the mat", "a fast brown fox jumps"],
                                                   ["the cat is on the mat", "the quick brown fox jumped"]]).score
    assert bleu_score(predictions, references) == pytest.approx(expected)


def pairs(count):
    sources = ["one two three", "four five six", "seven eight nine", "ten eleven twelve"]
    return [{"text": sources[i % 4], "summary": sources[i % 4].split()[0], "refs": [sources[i % 4].split()[0], "zero"]}
            for i in range(count)]


def seq2seq_run(jsonl, tmp_path, **changes):
    config = {"model": "tiny-t5", "task": "seq2seq", "strategy": "full", "train_file": str(jsonl("t.jsonl", pairs(16))),
              "validation_file": str(jsonl("v.jsonl", pairs(4))), "source_column": "text", "target_column": "summary",
              "references_column": "refs", "epochs": 40, "batch_size": 8, "learning_rate": 5e-3, "select": "last",
              "max_new_tokens": 4, "output_dir": str(tmp_path / "run")}
    return train({**config, **changes})


def test_an_encoder_decoder_learns_scores_saves_and_reloads(jsonl, tmp_path):
    untuned = seq2seq_run(jsonl, tmp_path, strategy="none", output_dir=str(tmp_path / "none"))
    result = seq2seq_run(jsonl, tmp_path)
    assert result.metrics["loss"] < untuned.metrics["loss"] / 5  # loss falls
    assert result.metrics["exact_match"] == 1.0 and result.metrics["rouge_l"] == 1.0  # the first word, learned
    saved = [json.loads(line) for line in (result.output_dir / "predictions.jsonl").read_text().splitlines()]
    assert result.metrics["bleu"] == pytest.approx(bleu_score([r["generated"] for r in saved], [r["references"] for r in saved]))
    assert saved[0] == {"source": "one two three", "references": ["one", "zero"], "generated": "one", "finished": True}
    assert predict(result.output_dir, [["seven eight nine"]]) == ["seven"]
    replies, _ = generate_answers(result.output_dir, [[{"role": "user", "content": "ten eleven twelve"}]])
    assert [reply.text for reply in replies] == ["ten"]
    again = evaluate_run(result.output_dir)
    assert again["metrics"] == pytest.approx(again["recorded"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["lora", "prompt-tuning", "ia3", "adapter"])
def test_adapters_and_prompts_apply_to_an_encoder_decoder(jsonl, tmp_path, strategy):
    result = seq2seq_run(jsonl, tmp_path, strategy=strategy, epochs=1)
    record = result.record
    assert 0 < record.trainable_params < record.total_params / 10
    assert set(record.metrics) == set(resolve_task("seq2seq")[0].metrics)
    again = evaluate_run(result.output_dir)
    assert again["metrics"]["loss"] == pytest.approx(record.metrics["loss"], rel=1e-4)


def test_lora_reaches_both_stacks_of_an_encoder_decoder(jsonl, tmp_path):
    from peftkit.loading import load_run

    result = seq2seq_run(jsonl, tmp_path, strategy="lora", epochs=1)
    _, model, _, _ = load_run(result.output_dir)
    adapted = {name.split(".lora_A")[0].split("block.")[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    stacks = {name.split(".block.")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert stacks == {"encoder", "decoder"}
    assert {"0.layer.1.DenseReluDense.wi", "0.layer.2.DenseReluDense.wi", "0.layer.1.EncDecAttention.q"} <= adapted


def test_seq2seq_options_are_checked(jsonl, tmp_path):
    assert (make_config({"task": "seq2seq", "train_file": "a.jsonl", "validation_file": "b.jsonl"}).num_beams,
            make_config({"task": "seq2seq", "train_file": "a.jsonl", "validation_file": "b.jsonl"}).max_target_length) == (1, 128)
    with pytest.raises(PeftkitError, match="source_prefix is an option of task 'seq2seq'"):
        make_config({"task": "sst2", "source_prefix": "summarize: "})
    with pytest.raises(PeftkitError, match="strategy 'linear-probe' trains only a new task head, and task 'seq2seq' has none"):
        make_config({"task": "seq2seq", "strategy": "linear-probe", "train_file": "a.jsonl", "validation_file": "b.jsonl"})
    bad = [{"text": "x", "summary": "y", "refs": "y"}]
    with pytest.raises(PeftkitError, match="column 'refs' must be a non-empty list of reference texts"):
        seq2seq_run(jsonl, tmp_path, train_file=str(jsonl("bad.jsonl", bad)))


def test_scitldr_through_instruction_tuning_is_prompted_and_scored_against_every_reference(tmp_path, data_dir):
    result = train({"model": "tiny-llama", "task": "scitldr", "strategy": "lora", "data_dir": str(data_dir),
                    "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                                     "{% if add_generation_prompt %}<assistant>{% endif %}",
                    "max_train_samples": 8, "max_eval_samples": 3, "max_length": 256, "epochs": 1, "select": "last",
                    "max_new_tokens": 4, "output_dir": str(tmp_path / "sft")})
    saved = [json.loads(line) for line in (result.output_dir / "predictions.jsonl").read_text().splitlines()]
    validation = [json.loads(line) for line in (data_dir / "scitldr" / "validation.jsonl").read_text().splitlines()[:3]]
    assert saved[0]["prompt"].startswith("Summarize this scientific abstract in one sentence.\n\n")
    assert [row["references"] for row in saved] == [row["references"] for row in validation]
    assert max(len(row["references"]) for row in saved) > 1
    assert {"rouge_1", "rouge_2", "rouge_l", "bleu"} <= set(result.metrics)


def test_hub_summarization_sets_map_onto_source_and_target(monkeypatch):
    """samsum by name, as a user with a hub gets it: dialogue -> source, summary -> target, and
    its labelled test split kept (the download itself is replaced here: no hub in the tests)."""
    import datasets

    from peftkit.tasks import load_data

    rows = [{"id": str(i), "dialogue": f"A: hi {i}\nB: hello", "summary": f"they greet {i}"} for i in range(3)]
    hub = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name in ("train", "validation", "test")})
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: asked.append(args) or hub)
    monkeypatch.delenv("PEFTKIT_DATA_DIR", raising=False)
    data = load_data(make_config({"model": "tiny-t5", "task": "samsum", "strategy": "lora"}))
    assert asked == [("Samsung/samsum",)] and resolve_task("samsum")[0].name == "seq2seq"
    assert data.train[0]["source"] == "A: hi 0\nB: hello" and data.train[0]["target"] == "they greet 0"
    assert data.test is not None and data.test[2]["references"] == ["they greet 2"]

