import logging

import pytest

from prism_lightning.chat_format import ChatFormatter, supports_system_role
from prism_lightning.testing import NO_SYSTEM_CHAT_TEMPLATE, build_tiny_tokenizer

PERSONA = "You are a careful mathematician."


@pytest.fixture(scope="module")
def formatter():
    return ChatFormatter(build_tiny_tokenizer())


@pytest.fixture(scope="module")
def no_system_tokenizer():
    return build_tiny_tokenizer(chat_template=NO_SYSTEM_CHAT_TEMPLATE)


def test_no_persona_keeps_the_templates_default_system_prompt(formatter):
    prompt = formatter.prompt("What is 2+2?")
    assert "You are a tiny test assistant." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # identical in every stage: context None and placement "none" give the same string
    assert formatter.prompt("What is 2+2?", PERSONA, "none") == prompt
    assert formatter.prompt("What is 2+2?", None, "system") == prompt


def test_system_placement_replaces_the_system_prompt(formatter):
    prompt = formatter.prompt("What is 2+2?", PERSONA, "system")
    assert f"<|im_start|>system\n{PERSONA}<|im_end|>" in prompt
    assert "tiny test assistant" not in prompt


def test_user_placement_prepends_to_the_first_user_turn(formatter):
    prompt = formatter.prompt(["What is 2+2?", "And 3+3?"], PERSONA, "user", replies=["4"])
    assert f"user\n{PERSONA}\n\nWhat is 2+2?" in prompt
    assert prompt.count(PERSONA) == 1
    assert "<|im_start|>assistant\n4<|im_end|>" in prompt


def test_base_system_prompt_overrides_template_default():
    fmt = ChatFormatter(build_tiny_tokenizer(), base_system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in fmt.prompt("hi")
    assert "Be brief." not in fmt.prompt("hi", PERSONA, "system")


def test_template_without_system_role_falls_back_to_user_placement(no_system_tokenizer, caplog):
    assert supports_system_role(no_system_tokenizer) is False
    fmt = ChatFormatter(no_system_tokenizer)
    with caplog.at_level(logging.WARNING):
        first = fmt.prompt("hi", PERSONA, "system")
        fmt.prompt("hello", PERSONA, "system")
    assert first.startswith(f"[user] {PERSONA}\n\nhi")
    assert sum("no system role" in r.message for r in caplog.records) == 1  # logged once


def test_unknown_placement_is_rejected(formatter):
    with pytest.raises(ValueError, match="placement"):
        formatter.prompt("hi", PERSONA, "footer")


def test_tokenizer_without_template_gets_chatml():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    prompt = ChatFormatter(tok).prompt("hi", PERSONA)
    assert prompt.startswith(f"<|im_start|>system\n{PERSONA}")
