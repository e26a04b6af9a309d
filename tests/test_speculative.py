"""Self-speculative decoding (pipeline/eval/speculative.py): exactly plain greedy at the full r
for several draft settings, with its statistics, and clear errors for settings it cannot
honour."""

from __future__ import annotations

import pytest
from fixtures_model import SMALL_VOCAB

from pipeline.eval.adaptive import ExitRule
from pipeline.eval.generate import GenerationConfig, generate
from pipeline.eval.speculative import Speculation, generate_speculative

VOCAB = SMALL_VOCAB  # the vocabulary of small_eval_model
PROMPT = [3, 14, 15, 9, 26, 5]


@pytest.fixture(scope="module")
def model(small_eval_model):  # tests/fixtures_model.py
    return small_eval_model


@pytest.mark.parametrize("r,spec", [(6, "1:1"), (6, "2:3"), (8, "4:2"), (8, "7:5"), (12, "3:4")])
def test_speculative_equals_plain_greedy_at_full_r(model, r, spec):
    cfg = GenerationConfig(max_new_tokens=20, r=r)
    plain = generate(model, PROMPT, cfg)
    fast = generate_speculative(model, PROMPT, cfg, Speculation.parse(spec))
    assert fast.new_ids == plain.new_ids
    st = fast.stats
    assert st.rounds >= 1 and 0 <= st.accepted <= st.drafted
    # every round yields its accepted drafts plus one verified token
    assert len(fast.new_ids) - 1 <= st.accepted + st.rounds
    d = st.to_dict(len(fast.new_ids))
    assert d["acceptance_rate"] == st.accepted / st.drafted
    assert d["core_iterations_plain"] == r * 20


def test_good_drafts_are_accepted_and_save_iterations(model):
    # drafting with r - 1 iterations of a converging recurrence agrees with r most of the time
    cfg = GenerationConfig(max_new_tokens=24, r=12)
    res = generate_speculative(model, PROMPT, cfg, Speculation(11, 3))
    assert res.new_ids == generate(model, PROMPT, cfg).new_ids
    assert res.stats.acceptance_rate > 0.5
    assert res.stats.rounds < 23


def test_stop_id_ends_speculative_decoding_like_plain(model):
    first = generate(model, PROMPT, GenerationConfig(max_new_tokens=16, r=6)).new_ids
    cfg = GenerationConfig(max_new_tokens=16, r=6, stop_ids=[first[5]])
    res = generate_speculative(model, PROMPT, cfg, Speculation(2, 4))
    assert res.new_ids == generate(model, PROMPT, cfg).new_ids == first[: first.index(first[5]) + 1]


@pytest.mark.parametrize(
    "cfg_kw,spec,match",
    [
        (dict(r=6), "6:2", "DRAFT_R must be in 1..r-1 = 1..5"),
        (dict(r=6), "9:2", "DRAFT_R must be in 1..r-1"),
        (dict(r=6), "0:2", "DRAFT_R must be in 1..r-1"),
        (dict(r=6), "2:0", "N \\(drafts per round\\) must be >= 1"),
        (dict(r=6, temperature=0.7), "2:2", "sampling"),
        (dict(r=6, exit_rule=ExitRule("kl", 1e-3)), "2:2", "adaptive exit"),
        (dict(r=6, kv_budget=2), "2:2", "KV budget below r"),
        (dict(r=6, state_init="random", continuous_cot=True), "2:2", "continuous CoT, a random"),
    ],
)
def test_bad_settings_are_clear_errors(model, cfg_kw, spec, match):
    with pytest.raises(ValueError, match=match):
        generate_speculative(model, PROMPT, GenerationConfig(**cfg_kw), Speculation.parse(spec))


def test_unparsable_setting_is_a_clear_error():
    for text in ("4", "a:b", "4:3:2"):
        with pytest.raises(ValueError, match="expected DRAFT_R:N"):
            Speculation.parse(text)
