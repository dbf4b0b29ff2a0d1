"""Prompt rendering with the tiny checkpoint's real tokenizer and chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from pio_vllm.errors import EmptyPromptError, InvalidRequestError, TooManyImagesError
from pio_vllm.intake.prompt_renderer import IMAGE_PLACEHOLDER, render_prompt
from pio_vllm.request import PioRequest


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_plain_prompt_gets_chat_template_and_placeholders(tokenizer) -> None:  # type: ignore[no-untyped-def]
    r = render_prompt(PioRequest(prompt="Describe", images=[b"a", b"b"]), tokenizer, 4)
    assert r.text == (f"<|im_start|>user\n{IMAGE_PLACEHOLDER}{IMAGE_PLACEHOLDER}Describe"
                      "<|im_end|>\n<|im_start|>assistant\n")
    assert r.images == [b"a", b"b"]


def test_openai_messages_collect_image_urls_in_order(tokenizer) -> None:  # type: ignore[no-untyped-def]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "First"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
            {"type": "image_url", "image_url": "http://x/b.png"},
        ]},
    ]
    r = render_prompt(PioRequest(messages=messages), tokenizer, 4)
    assert r.images == ["data:image/png;base64,AAA", "http://x/b.png"]
    assert r.text.count(IMAGE_PLACEHOLDER) == 2
    assert r.text.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_request_images_go_first_in_first_user_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    r = render_prompt(
        PioRequest(messages=[{"role": "user", "content": "Hi"}], images=[b"x"]), tokenizer, 4)
    assert f"user\n{IMAGE_PLACEHOLDER}Hi" in r.text


@pytest.mark.parametrize(
    ("request_", "error", "match"),
    [
        (PioRequest(prompt=""), EmptyPromptError, "prompt is empty"),
        (PioRequest(prompt="   "), EmptyPromptError, "prompt is empty"),
        (PioRequest(), EmptyPromptError, "prompt is empty"),
        (PioRequest(messages=[]), EmptyPromptError, "non-empty list"),
        (PioRequest(messages=[{"role": "user", "content": ""}]), EmptyPromptError, "no text"),
        (PioRequest(prompt="a", messages=[{"role": "user", "content": "b"}]),
         InvalidRequestError, "not both"),
        (PioRequest(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
         InvalidRequestError, "type 'audio'"),
        (PioRequest(prompt="x", images=[b"1"] * 5), TooManyImagesError, "5 images; at most 4"),
        (PioRequest(prompt="<|image_pad|> x", raw_prompt=True), InvalidRequestError,
         "1 <\\|image_pad\\|> placeholders but 0 images"),
    ],
)
def test_bad_prompts_name_the_problem(tokenizer, request_, error, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=match):
        render_prompt(request_, tokenizer, 4)
