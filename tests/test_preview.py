"""The prompt line the dashboard shows for an entry: a pure function of the request body."""

from __future__ import annotations

from typing import Any

import pytest

from cache.preview import PREVIEW_LENGTH, prompt_preview


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]},
            "Hello there",
            id="chat-last-user-message",
        ),
        pytest.param(
            {
                "messages": [
                    {"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "an answer"},
                    {"role": "user", "content": "follow-up"},
                ]
            },
            "follow-up",
            id="chat-conversation",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "\n\n   Title line  \nbody"}]},
            "Title line",
            id="first-non-blank-line",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": "tabs\tand   spaces"}]}, "tabs and spaces", id="whitespace"
        ),
        pytest.param(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "data": "..."}},
                            {"type": "text", "text": "What is in this picture?"},
                        ],
                    }
                ]
            },
            "What is in this picture?",
            id="anthropic-content-blocks",
        ),
        pytest.param({"input": "Write a haiku"}, "Write a haiku", id="responses-string"),
        pytest.param(
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Describe Paris"}]}]},
            "Describe Paris",
            id="responses-items",
        ),
        pytest.param({"prompt": "Once upon a time"}, "Once upon a time", id="completions"),
        pytest.param({"prompt": ["first prompt", "second"]}, "first prompt", id="completions-list"),
        pytest.param({"input": ["embed me", "and me"]}, "embed me", id="embeddings-list"),
        pytest.param({"input": [[1, 2, 3]]}, None, id="embeddings-tokens"),
        pytest.param({"message": "Hi Cohere"}, "Hi Cohere", id="cohere-v1"),
        pytest.param({"messages": [{"role": "system", "content": "only a system prompt"}]}, None, id="no-user"),
        pytest.param({"messages": [{"role": "user", "content": "   \n  "}]}, None, id="blank"),
        pytest.param({"messages": "not a list"}, None, id="malformed"),
        pytest.param({"model": "m"}, None, id="nothing"),
    ],
)
def test_the_preview_is_the_first_line_of_the_last_user_input(payload: dict[str, Any], expected: str | None) -> None:
    assert prompt_preview(payload) == expected


def test_a_long_line_is_cut_to_the_preview_length_with_an_ellipsis() -> None:
    line = "word " * 40
    preview = prompt_preview({"messages": [{"role": "user", "content": line}]})
    assert preview is not None and len(preview) == PREVIEW_LENGTH == 80
    assert preview.endswith("…") and line.startswith(preview[:-1])
    exact = "x" * PREVIEW_LENGTH
    assert prompt_preview({"prompt": exact}) == exact
