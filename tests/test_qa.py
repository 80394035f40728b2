"""Extractive QA: answer positions in windows, the windows of a long context, the best span
over windows and SQuAD's metrics, all checked by hand; data checks; strategies end to end on
a tiny BERT (prompt tuning's answer positions aligned). MiniLM on SQuAD is measured by the
benchmark recipes (recipes/minilm-squad-*.yaml through `peftkit compare`), not here: a run that
learns takes minutes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.inference import evaluate_run, predict
from peftkit.models import load_tokenizer, resolve_model
from peftkit.run import train
from peftkit.tasks.qa import answer_tokens, best_answers, windows
from peftkit.text_metrics import normalize_answer, squad_scores, token_f1

CONTEXT = "It was written by Ann Lee in Paris in 1990."


def test_answer_tokens_by_hand():
    # [CLS] who ? [SEP] ann lee wrote [SEP]; context offsets of "Ann Lee wrote"
    offsets = [(0, 0), (0, 3), (3, 4), (0, 0), (0, 3), (4, 7), (8, 13), (0, 0)]
    inside = [False] * 4 + [True] * 3 + [False]
    assert answer_tokens(offsets, inside, 4, 7) == (5, 5)      # "Lee"
    assert answer_tokens(offsets, inside, 0, 7) == (4, 5)      # "Ann Lee"
    assert answer_tokens(offsets, inside, 5, 13) == (5, 6)     # a span starting inside a token takes that token
    assert answer_tokens(offsets, inside, 8, 20) == (0, 0)     # not whole in this window: the [CLS] token
    assert answer_tokens(offsets, inside, 3, 3) == (0, 0)      # no answer text


def test_a_long_context_is_windowed_with_overlap_and_the_answer_found_in_each_window_that_holds_it():
    from datasets import Dataset

    tokenizer = load_tokenizer(resolve_model("minilm"))
    context = " ".join(f"w{i}" for i in range(60)) + " the answer is Paris ."
    start = context.index("Paris")
    raw = Dataset.from_dict({"question": ["where ?"], "context": [context],
                             "answers": [{"text": ["Paris"], "answer_start": [start]}]})
    features = windows(raw, tokenizer, max_length=48, doc_stride=16)
    assert len(features) > 2 and set(features["example_index"]) == {0}
    for feature in features:
        spans = feature["offset_mapping"]
        assert len(feature["input_ids"]) <= 48 and feature["length"] == len(feature["input_ids"])
        assert spans[0] is None  # [CLS]: not context
        s, e = feature["start_positions"], feature["end_positions"]
        if (s, e) != (0, 0):
            assert context[spans[s][0]:spans[e][1]] == "Paris"
    assert features[-1]["start_positions"] != 0  # the last window ends with the answer
    # consecutive windows share doc_stride context tokens
    first, second = ([s for s in f["offset_mapping"] if s is not None] for f in features.select([0, 1]))
    assert [tuple(s) for s in first[-16:]] == [tuple(s) for s in second[:16]]


def test_best_span_over_windows():
    contexts = ["Ann Lee lives in Paris", "xyz"]
    # example 0 in two windows; example 1 in one window whose only valid span is weak
    spans0 = [None, [0, 3], [4, 7], [8, 13], [14, 16], [17, 22]]
    spans1 = [None, [0, 3]]
    start = [np.array([9., 1, 0, 0, 0, 0]), np.array([0., 0, 0, 0, 0, 5]), np.array([0., 0.5])]
    end = [np.array([9., 0, 2, 0, 0, 0]), np.array([0., 0, 0, 0, 0, 4]), np.array([0., 0.5])]
    answers = best_answers(start, end, [spans0, spans0, spans1], [0, 0, 1], contexts)
    # window 0: [CLS] is no answer; best is "Ann Lee" (1+2=3); window 1: "Paris" (5+4=9) wins
    assert answers == ["Paris", "xyz"]
    # an end before its start is never paired: only "Lee" (s=2, e=2) remains valid below
    assert best_answers([np.array([0., -9, 3, 0])], [np.array([0., 5, 1, 0])], [[None, [0, 3], [4, 7], [8, 10]]], [0],
                        ["Ann Lee is"]) == ["Lee"]


def test_squad_metrics_by_hand():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert token_f1("the Eiffel tower in Paris", "Eiffel Tower") == pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
    scores = squad_scores(["Eiffel Tower", "1990", "Paris"], [["the Eiffel Tower"], ["in 1991", "1990"], ["Lyon"]])
    assert scores == {"exact_match": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}  # best of the references


def squad_like(count):
    rows = []
    for i in range(count):
        city = ["Paris", "Rome", "Oslo"][i % 3]
        context = f"Ann Lee was born in {city} in {1950 + i}."
        rows.append({"question": "Where was Ann Lee born?", "context": context,
                     "answers": {"text": [city], "answer_start": [context.index(city)]}})
    return rows


@pytest.mark.parametrize("row,message", [
    ({"question": "q", "context": "abc", "answers": {"text": ["x"], "answer_start": [0]}},
     "answer 'x' is not at character 0 of the context"),
    ({"question": "q", "context": "abc", "answers": {"text": [], "answer_start": []}}, "no answer"),
    ({"question": "q", "context": "abc", "answers": "abc"}, "must be {\"text\": [...], \"answer_start\": [...]}"),
])
def test_bad_answers_get_one_line(jsonl, tmp_path, row, message):
    config = {"model": "tiny-bert", "task": "qa", "strategy": "lora", "train_file": str(jsonl("t.jsonl", squad_like(4) + [row])),
              "validation_file": str(jsonl("v.jsonl", squad_like(2))), "output_dir": str(tmp_path / "run")}
    with pytest.raises(PeftkitError, match=re.escape(message)):
        train(config)
    assert not (tmp_path / "run").exists()


def test_doc_stride_must_leave_the_window_room_to_move():
    assert make_config({"task": "squad"}).doc_stride == 128
    with pytest.raises(PeftkitError, match="doc_stride 64 must be under half of max_length 128"):
        make_config({"task": "squad", "max_length": 128, "doc_stride": 64})
    with pytest.raises(PeftkitError, match="doc_stride is an option of task 'qa'"):
        make_config({"task": "sst2", "doc_stride": 10})


def test_own_files_train_and_predict(jsonl, tmp_path):
    result = train({"model": "tiny-bert", "task": "qa", "strategy": "full", "train_file": str(jsonl("t.jsonl", squad_like(24))),
                    "validation_file": str(jsonl("v.jsonl", squad_like(6))), "epochs": 20, "batch_size": 8,
                    "learning_rate": 3e-3, "select": "last", "output_dir": str(tmp_path / "run")})
    assert result.metrics["exact_match"] == 1.0  # the answer is always the word after "born in"
    assert predict(result.output_dir, [["Where was Ann Lee born?", "Ann Lee was born in Rome in 1977."]]) == ["Rome"]
    saved = [line for line in (result.output_dir / "predictions.jsonl").read_text().splitlines() if line]
    assert len(saved) == 6 and '"prediction": "Paris"' in saved[0]


@pytest.mark.parametrize("strategy", ["lora", "adapter", "linear-probe", "prompt-tuning", "bitfit"])
def test_strategies_train_reload_and_answer(tmp_path, data_dir, strategy):
    result = train({"model": "tiny-bert", "task": "squad", "strategy": strategy, "data_dir": str(data_dir), "max_length": 128,
                    "max_train_samples": 24, "max_eval_samples": 8, "epochs": 1, "batch_size": 8,
                    "output_dir": str(tmp_path / strategy)})
    assert set(result.metrics) == {"f1", "exact_match", "loss"}
    again = evaluate_run(result.output_dir)
    assert again["metrics"] == pytest.approx(again["recorded"], rel=1e-4)
    (answer,) = predict(result.output_dir, [["Who wrote it?", CONTEXT]])
    assert answer in CONTEXT


def test_prompt_tuning_reads_the_answer_at_the_real_tokens(tmp_path, data_dir):
    """PEFT puts the virtual tokens first; the answer positions must move with them, or the
    loss trains the model on the token `num_virtual_tokens` before the answer."""
    from peftkit.loading import load_run

    result = train({"model": "tiny-bert", "task": "squad", "strategy": {"name": "prompt-tuning", "num_virtual_tokens": 4},
                    "data_dir": str(data_dir), "max_length": 128, "max_train_samples": 8, "max_eval_samples": 4,
                    "epochs": 1, "output_dir": str(tmp_path / "pt")})
    _, model, tokenizer, _ = load_run(result.output_dir)
    inputs = tokenizer(["who?"], [CONTEXT], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)

        def loss_at(position):
            at = torch.tensor([position])
            return model(**inputs, start_positions=at, end_positions=at).loss.item()

        p, q = 5, 9
        # the softmax runs over the virtual positions too, so compare two answers: its normaliser cancels
        scores = out.start_logits[0] + out.end_logits[0]
    assert out.start_logits.shape[1] == inputs["input_ids"].shape[1]
    assert loss_at(p) - loss_at(q) == pytest.approx((scores[q] - scores[p]).item() / 2, abs=1e-4)
