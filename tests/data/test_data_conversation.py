"""Conversation templates render exactly LLaVA's prompts and split them into trained pieces."""
import pytest

from llava_san.conversation import IMAGE_PLACEHOLDER, Piece, get_template

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def llava_get_prompt_two(system, roles, sep, sep2, messages):
    """LLaVA ``Conversation.get_prompt`` for ``SeparatorStyle.TWO`` (reference, copied logic)."""
    seps = [sep, sep2]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def test_registry():
    assert get_template("vicuna_v1").name == "vicuna_v1"
    assert get_template("plain").name == "plain"
    with pytest.raises(ValueError, match=r"unknown conversation template 'v9'.*\['plain', 'vicuna_v1'\]"):
        get_template("v9")


def test_vicuna_render_prompt_golden():
    t = get_template("vicuna_v1")
    prompt = t.render_prompt("<image>\nWhat is the colour of the shape?")
    assert prompt == SYSTEM + " USER: <image>\nWhat is the colour of the shape? ASSISTANT:"
    assert prompt.endswith("ASSISTANT:")
    messages = [("USER", "<image>\nWhat is the colour of the shape?"), ("ASSISTANT", None)]
    assert prompt == llava_get_prompt_two(SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", messages)
    assert t.stop_str == "</s>"


def test_vicuna_training_pieces_golden():
    t = get_template("vicuna_v1")
    turns = [("human", "<image>\nWhat is it?"), ("gpt", "A red circle."),
             ("human", "Is it big?"), ("gpt", "no")]
    rendered = t.render(turns)
    assert rendered == (SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A red circle.</s>"
                        "USER: Is it big? ASSISTANT: no</s>")
    messages = [("USER", v) if r == "human" else ("ASSISTANT", v) for r, v in turns]
    assert rendered == llava_get_prompt_two(SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", messages)
    pieces = t.pieces(turns)
    assert "".join(p.text for p in pieces) == rendered
    assert [p.text for p in pieces if p.trained] == [" A red circle.", "</s>", " no", "</s>"]
    assert [p.kind for p in pieces if p.kind != "text"] == ["image", "sep", "sep"]
    assert pieces[0] == Piece(SYSTEM + " USER: ", False)
    assert pieces[1] == Piece(IMAGE_PLACEHOLDER, False, "image")


def test_vicuna_text_only_and_unanswered_turn():
    t = get_template("vicuna_v1")
    turns = [("human", "Hi"), ("gpt", "Hello"), ("human", "Bye")]
    pieces = t.pieces(turns)
    expected = SYSTEM + " USER: Hi ASSISTANT: Hello</s>USER: Bye "
    assert "".join(p.text for p in pieces) == t.render(turns) == expected
    assert not any(p.kind == "image" for p in pieces)
    assert [p.text for p in pieces if p.trained] == [" Hello", "</s>"]


def test_plain_template():
    t = get_template("plain")
    pieces = t.pieces([("human", "<image>\nDescribe the image."), ("gpt", "a red circle")])
    # LLaVA preprocess_plain: the human text is replaced by the bare <image>; caption + "\n" trained.
    assert "".join(p.text for p in pieces) == "<image>a red circle\n"
    assert [p.text for p in pieces if p.trained] == ["a red circle\n"]
    assert t.render_prompt("<image>\nDescribe.") == "<image>\nDescribe.\n"
    assert t.stop_str == "\n"
    with pytest.raises(ValueError, match="exactly one human turn"):
        t.pieces([("human", "<image>\nq"), ("gpt", "a"), ("human", "q2"), ("gpt", "b")])
