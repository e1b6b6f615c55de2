"""The Python API under bad input (issue 22): every kind of bad argument is an ``InputError`` naming the
value, never a TypeError / AttributeError / IndexError / jinja2 error, a silently wrong answer or a huge
allocation; the CLI answers the same in one line with exit code 2."""

from __future__ import annotations

import pytest
import torch
from eval_support import byte_model, byte_tokenizer, save_model_dir

import tokensieve
from tokensieve import cli
from tokensieve.engine.runner import Sampling


@pytest.fixture(scope="module")
def tiny():
    return byte_model(max_pos=256), byte_tokenizer()


def refusing_template():
    tok = byte_tokenizer()
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    return tok


BAD_CALLS = [  # (description, keyword arguments of generate (prompt included), words of the message)
    (
        "two rows of token ids",
        {"prompt_or_messages": torch.tensor([[1, 2, 3], [4, 5, 6]])},
        ["[2, 3]", "generate_batch"],
    ),
    ("three dimensions", {"prompt_or_messages": torch.ones(1, 1, 3, dtype=torch.long)}, ["[1, 1, 3]"]),
    ("float token ids", {"prompt_or_messages": torch.tensor([[1.5, 2.0]])}, ["integer tensor", "float32"]),
    ("an id past the vocabulary", {"prompt_or_messages": torch.tensor([[1, 99999]])}, ["[0, 256]", "99999"]),
    ("a negative id", {"prompt_or_messages": torch.tensor([[1, -3]])}, ["-3"]),
    ("no prompt", {"prompt_or_messages": None}, ["NoneType"]),
    ("an int prompt", {"prompt_or_messages": 5}, ["int"]),
    ("bytes", {"prompt_or_messages": b"abc"}, ["bytes"]),
    ("a list of ints", {"prompt_or_messages": [1, 2, 3]}, ["message 0", "dict"]),
    ("a message that is a string", {"prompt_or_messages": ["hello"]}, ["message 0", "'hello'"]),
    (
        "content None",
        {"prompt_or_messages": [{"role": "user", "content": None}]},
        ["content must be a string", "NoneType"],
    ),
    ("content an int", {"prompt_or_messages": [{"role": "user", "content": 5}]}, ["content must be a string"]),
    ("no role", {"prompt_or_messages": [{"content": "hi"}]}, ["'role'"]),
    ("a lone surrogate", {"prompt_or_messages": "a \udcff b"}, ["not valid Unicode"]),
    (
        "separator ids an int",
        {"prompt_or_messages": "hi", "method": "sepllm", "separator_ids": 3},
        ["separator_ids", "3"],
    ),
    ("sampling a dict", {"prompt_or_messages": "hi", "sampling": {"temperature": 1}}, ["Sampling", "dict"]),
    ("on_token not callable", {"prompt_or_messages": "hi", "on_token": 5}, ["on_token", "int"]),
    ("allow_long a string", {"prompt_or_messages": "hi", "allow_long": "no"}, ["allow_long", "'no'"]),
    (
        "max_new_tokens past the positions",
        {"prompt_or_messages": "hi", "max_new_tokens": 10**12},
        ["256 positions", str(10**12)],
    ),
]


@pytest.mark.parametrize("what, kwargs, words", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_arguments_raise_input_error(tiny, what, kwargs, words):
    model, tok = tiny
    with pytest.raises(tokensieve.InputError) as e:
        tokensieve.generate(model, tok, **{"max_new_tokens": 2, **kwargs})
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_prompts_of_a_batch_name_the_prompt(tiny):
    model, tok = tiny
    with pytest.raises(
        tokensieve.InputError, match=r"prompt 1: token ids must be one prompt, \[n\] or \[1, n\], got shape \[2, 2\]"
    ):
        tokensieve.generate_batch(model, tok, ["fine", torch.tensor([[1, 2], [3, 4]])], max_new_tokens=2)
    with pytest.raises(tokensieve.InputError, match="prompt 0: a prompt is a string"):
        tokensieve.generate_batch(model, tok, [None], max_new_tokens=2)
    with pytest.raises(tokensieve.InputError, match="max_new_tokens must be at most the model's maximum of 256"):
        tokensieve.generate_batch(model, tok, ["a", "b"], max_new_tokens=[2, 10**9])


def test_one_prompt_of_token_ids_in_any_accepted_shape_answers_the_same(tiny):
    model, tok = tiny
    ids = torch.tensor(tok("the same prompt")["input_ids"])
    a = tokensieve.generate(model, tok, ids, max_new_tokens=4).token_ids
    assert tokensieve.generate(model, tok, ids[None], max_new_tokens=4).token_ids == a
    assert tokensieve.generate(model, tok, ids.int()[None], max_new_tokens=4).token_ids == a


def test_a_chat_template_that_raises_is_an_input_error(tiny):
    model, _ = tiny
    with pytest.raises(tokensieve.InputError, match="chat template rejected the messages: roles must alternate"):
        tokensieve.generate(model, refusing_template(), [{"role": "user", "content": "hi"}], max_new_tokens=2)


def test_a_seed_outside_the_generator_range_is_refused():
    with pytest.raises(tokensieve.InputError, match="seed must be an integer in"):
        Sampling(temperature=1.0, seed=2**70)


def test_max_new_tokens_past_the_positions_runs_with_allow_long_only_when_asked(tiny):
    model, tok = tiny
    assert tokensieve.generate(model, tok, "hi", max_new_tokens=256).generated_tokens <= 256  # at the limit: fine
    with pytest.raises(tokensieve.InputError, match="max_new_tokens must be at most"):
        tokensieve.generate(model, tok, "hi", max_new_tokens=257)


def test_cli_max_new_tokens_far_past_the_positions_is_one_line_and_exit_2(tmp_path, capsys):
    d = save_model_dir(tmp_path / "m", max_pos=512)
    capsys.readouterr()  # saving the model folder's progress output
    code = cli.main(
        ["ask", "--model", str(d), "--file", str(d / "hay.txt"), "--question", "q", "--max-new-tokens", "1000000000000"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "max_new_tokens must be at most the model's maximum of 512 positions" in err
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' loading bar aside)
    assert len(errors) == 1 and errors[0].startswith("tokensieve") and "Traceback" not in err
