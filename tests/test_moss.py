"""The MOSS-003 format: exact rendering, parsing back, the raw SFT files, and the loss mask on real tokens."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf.moss import (DEFAULT_META_INSTRUCTION, EOM, PAD, SPECIAL_TOKENS, Dialogue, FieldError, Turn,
                       build_meta_instruction, parse, render, segments, split_reply, tokenize_dialogue,
                       tokenize_prompt, trained_spans)

META = "You are MOSS.\n"

CALC_TURN = Turn("What is 2+3?", inner_thoughts="I should use the calculator.", commands='Calculate("2+3")',
                 results='Calculate("2+3") => 5', moss="2+3 is 5.")


def test_single_turn_renders_exactly():
    d = Dialogue([Turn("Hi", moss="Hello!")], META)
    assert render(d) == "You are MOSS.\n<|Human|>: Hi<eoh>\n<|MOSS|>: Hello!<eom>\n"


def test_multi_turn_renders_exactly():
    d = Dialogue([Turn("Hi", moss="Hello!"), Turn("How are you?", moss="Fine.")], META)
    assert render(d) == ("You are MOSS.\n<|Human|>: Hi<eoh>\n<|MOSS|>: Hello!<eom>\n"
                         "<|Human|>: How are you?<eoh>\n<|MOSS|>: Fine.<eom>\n")


def test_calculator_turn_renders_the_same_in_both_modes():
    expected = ('You are MOSS.\n<|Human|>: What is 2+3?<eoh>\n'
                '<|Inner Thoughts|>: I should use the calculator.<eot>\n'
                '<|Commands|>: Calculate("2+3")<eoc>\n'
                '<|Results|>:\nCalculate("2+3") => 5\n<eor>\n'
                '<|MOSS|>: 2+3 is 5.<eom>\n')
    d = Dialogue([CALC_TURN], META)
    assert render(d, plugin=True) == expected
    assert render(d, plugin=False) == expected


def test_plugin_mode_writes_absent_segments_as_none():
    d = Dialogue([Turn("Hi", moss="Hello!")], META)
    assert render(d, plugin=True) == ("You are MOSS.\n<|Human|>: Hi<eoh>\n"
                                      "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n"
                                      "<|Results|>: None<eor>\n<|MOSS|>: Hello!<eom>\n")
    assert render(d, plugin=False) == "You are MOSS.\n<|Human|>: Hi<eoh>\n<|MOSS|>: Hello!<eom>\n"


def test_chinese_dialogue_renders_exactly():
    d = Dialogue([Turn("你好", moss="你好！有什么可以帮你的吗？"), Turn("介绍一下复旦大学", moss="复旦大学位于上海。")],
                 "你是MOSS。\n")
    assert render(d) == ("你是MOSS。\n<|Human|>: 你好<eoh>\n<|MOSS|>: 你好！有什么可以帮你的吗？<eom>\n"
                         "<|Human|>: 介绍一下复旦大学<eoh>\n<|MOSS|>: 复旦大学位于上海。<eom>\n")


def test_prompt_endings():
    prompt = Dialogue([Turn("Hi", moss="Hello!"), Turn("2+3?")], META)
    assert prompt.is_prompt
    assert render(prompt).endswith("<|Human|>: 2+3?<eoh>\n<|MOSS|>:")
    # The plugin model writes its Inner Thoughts first, so its prompt stops right after the human turn.
    assert render(prompt, plugin=True).endswith("<|Human|>: 2+3?<eoh>\n")
    # Second plugin pass: the program has written the Results, the model writes `<|MOSS|>:` next.
    second = Dialogue([CALC_TURN], META).as_prompt()
    assert render(second, plugin=True).endswith("Calculate(\"2+3\") => 5\n<eor>\n")


def test_as_prompt_and_with_reply():
    d = Dialogue([CALC_TURN], META, {"id": 7})
    plain = d.as_prompt()
    assert plain.turns[0].moss is None and plain.turns[0].results == CALC_TURN.results
    assert d.as_prompt(plugin=True).turns[0] == Turn(CALC_TURN.human)
    assert plain.with_reply("five") == Dialogue([Turn(**{**CALC_TURN.__dict__, "moss": "five"})], META, {"id": 7})
    assert d.turns[0].moss == "2+3 is 5."  # copies, not views


def test_build_meta_instruction_lines():
    text = build_meta_instruction({"Web Search": None, "Calculator": "Calculate(expression)"}, base="Base.\n")
    assert text == "Base.\n- Web Search: disabled.\n- Calculator: enabled. API: Calculate(expression)\n"
    default = build_meta_instruction()
    assert default.startswith(DEFAULT_META_INSTRUCTION)
    assert default.endswith("Capabilities and tools that MOSS can possess.\n- Web Search: disabled.\n"
                            "- Calculator: disabled.\n- Equation Solver: disabled.\n- Text-to-Image: disabled.\n")


# --- parsing ---------------------------------------------------------------------------------------------

# Field text never holds `<`, `|` or `>`, so it cannot contain a role tag or an end token.
TEXT = st.text(st.one_of(st.characters(codec="utf-8", exclude_characters="<|>"),
                         st.sampled_from("你好世界复旦\n ")), max_size=20).filter(lambda s: s != "None")
OPTIONAL = st.none() | TEXT


@st.composite
def dialogues(draw: st.DrawFn) -> Dialogue:
    n = draw(st.integers(1, 4))
    turns = [Turn(draw(TEXT), draw(OPTIONAL), draw(OPTIONAL), draw(OPTIONAL), draw(TEXT)) for _ in range(n)]
    if draw(st.booleans()):
        turns[-1].moss = None
    return Dialogue(turns, draw(TEXT))


@settings(max_examples=300, deadline=None)
@given(dialogues(), st.booleans())
def test_render_then_parse_round_trips(d: Dialogue, plugin: bool):
    text = render(d, plugin)
    assert parse(text) == d
    assert parse(text, plugin=plugin) == d
    assert "".join(t for t, _ in segments(d, plugin)) == text


def test_parse_keeps_newlines_and_none_in_plain_mode():
    d = Dialogue([Turn("line 1\nline 2", results="a\nb", moss="x\n\ny")], "meta\n\n")
    assert parse(render(d)) == d
    literal = Dialogue([Turn("q", inner_thoughts="None", moss="a")])
    assert parse(render(literal), plugin=False) == literal
    assert parse(render(literal)).turns[0].inner_thoughts is None


def test_parse_rejects_text_without_turns():
    with pytest.raises(ValueError, match="Human"):
        parse("just a meta instruction")


def test_split_reply():
    assert split_reply(" 5 apples.<eom>\n<|Human|>:") == "5 apples."
    assert split_reply(" cut off mid-sentence  ") == "cut off mid-sentence"
    assert split_reply("<|MOSS|>: plugin reply<eom>") == "plugin reply"


# --- JSON ------------------------------------------------------------------------------------------------


def test_raw_moss_003_record_is_read():
    raw = {
        "conversation_id": 1, "category": "tool", "num_turns": 2, "meta_instruction": "You are MOSS.\n",
        "chat": {
            "turn_1": {"Human": "<|Human|>: 2+3等于几？<eoh>\n",
                       "Inner Thoughts": "<|Inner Thoughts|>: 用计算器<eot>\n",
                       "Commands": '<|Commands|>: Calculate("2+3")<eoc>\n',
                       "Tool Responses": '<|Results|>:\nCalculate("2+3") => 5<eor>\n',
                       "MOSS": "<|MOSS|>: 等于5。<eom>\n"},
            "turn_2": {"Human": "<|Human|>: 谢谢<eoh>\n", "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                       "Commands": "<|Commands|>: None<eoc>\n", "Tool Responses": None,
                       "MOSS": "<|MOSS|>: 不客气！<eom>\n"},
        },
    }
    d = Dialogue.from_json(raw)
    assert d.meta_instruction == "You are MOSS.\n"
    assert d.turns == [Turn("2+3等于几？", "用计算器", 'Calculate("2+3")', 'Calculate("2+3") => 5', "等于5。"),
                       Turn("谢谢", moss="不客气！")]
    assert d.metadata == {"conversation_id": 1, "category": "tool"}
    # Rendered back byte for byte: the meta instruction and every segment's text, in order (the null one has none).
    segments_text = [v for turn in raw["chat"].values() for v in turn.values() if v is not None]
    assert render(d, plugin=True) == render(d) == raw["meta_instruction"] + "".join(segments_text)


def test_structured_json_round_trips_and_keeps_unknown_keys():
    obj = {"meta_instruction": "m", "turns": [{"human": "h", "moss": "r"}], "source": "web", "id": 3}
    d = Dialogue.from_json(obj)
    assert d.metadata == {"source": "web", "id": 3}
    assert d.to_json() == obj


@pytest.mark.parametrize("obj, field", [
    ({"turns": []}, "turns"),
    ({"turns": [{"moss": "r"}]}, "turns[0].human"),
    ({"turns": [{"human": "h", "moss": "r"}, {"human": 3}]}, "turns[1].human"),
    ({"turns": [{"human": "h"}, {"human": "h2"}]}, "turns[0].moss"),
    ({"turns": [{"human": "h", "mos": "typo"}]}, "turns[0].mos"),
])
def test_bad_json_names_the_field(obj: dict, field: str):
    with pytest.raises(FieldError) as err:
        Dialogue.from_json(obj)
    assert err.value.field == field


# --- tokenization ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained on a few rendered dialogues, with the MOSS special tokens."""
    corpus = [render(Dialogue([CALC_TURN, Turn("你好", moss="你好！")], DEFAULT_META_INSTRUCTION), p)
              for p in (False, True)] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS + [PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, additional_special_tokens=SPECIAL_TOKENS)


def masked_spans(tokenizer: PreTrainedTokenizerFast, ids: list[int], mask: list[int]) -> list[str]:
    """Decode each run of masked tokens."""
    spans, run = [], []
    for tok, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(tok)
        elif run:
            spans.append(tokenizer.decode(run, clean_up_tokenization_spaces=False))
            run = []
    return spans


def test_end_tokens_are_single_tokens(tokenizer: PreTrainedTokenizerFast):
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_loss_mask_covers_exactly_the_reply(tokenizer: PreTrainedTokenizerFast):
    d = Dialogue([Turn("Hi", moss="Hello!"), Turn("你好", moss="你好！")], DEFAULT_META_INSTRUCTION)
    out = tokenize_dialogue(d, tokenizer, max_length=1000)
    assert masked_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [" Hello!<eom>", " 你好！<eom>"]
    assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False) == render(d)
    assert out["truncated"] is False


def test_plugin_loss_mask_covers_thoughts_commands_and_reply(tokenizer: PreTrainedTokenizerFast):
    d = Dialogue([CALC_TURN, Turn("谢谢", moss="不客气")], META)
    out = tokenize_dialogue(d, tokenizer, max_length=1000, plugin=True)
    assert masked_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [
        '<|Inner Thoughts|>: I should use the calculator.<eot>\n<|Commands|>: Calculate("2+3")<eoc>',
        "<|MOSS|>: 2+3 is 5.<eom>",
        "<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>",
        "<|MOSS|>: 不客气<eom>",
    ]
    assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False) == render(d, plugin=True)


def test_plain_mode_with_plugin_segments_masks_thoughts_and_commands(tokenizer: PreTrainedTokenizerFast):
    out = tokenize_dialogue(Dialogue([CALC_TURN], META), tokenizer, max_length=1000)
    assert masked_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [
        '<|Inner Thoughts|>: I should use the calculator.<eot>\n<|Commands|>: Calculate("2+3")<eoc>',
        " 2+3 is 5.<eom>",
    ]


def test_prompt_tokens_are_the_start_of_the_dialogue_tokens(tokenizer: PreTrainedTokenizerFast):
    d = Dialogue([Turn("Hi", moss="Hello!"), Turn("2+3?", moss="5")], META)
    for plugin in (False, True):
        prompt_ids = tokenize_prompt(d.as_prompt(plugin), tokenizer, 1000, plugin)
        full = tokenize_dialogue(d, tokenizer, 1000, plugin)
        assert full["input_ids"][:len(prompt_ids)] == prompt_ids
        assert not any(full["loss_mask"][len(prompt_ids) - 1:len(prompt_ids)])
        assert full["loss_mask"][len(prompt_ids)] == 1


def test_truncation_drops_oldest_turns_and_keeps_meta_and_last(tokenizer: PreTrainedTokenizerFast):
    turns = [Turn(f"question {i}", moss=f"answer {i}") for i in range(4)]
    d = Dialogue(turns, META)
    keep_two = len(tokenize_dialogue(Dialogue(turns[2:], META), tokenizer, 1000)["input_ids"])
    out = tokenize_dialogue(d, tokenizer, max_length=keep_two)
    assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False) == render(Dialogue(turns[2:], META))
    assert out["turns_dropped"] == 2 and out["truncated"] is False

    # Not even meta + last turn fits: the end is cut.
    out = tokenize_dialogue(d, tokenizer, max_length=12)
    assert out["truncated"] is True and len(out["input_ids"]) == 12
    assert tokenizer.decode(out["input_ids"], clean_up_tokenization_spaces=False).startswith(META)
    assert EOM not in tokenizer.decode(out["input_ids"])


def test_prompt_truncation_keeps_meta_and_the_end(tokenizer: PreTrainedTokenizerFast):
    prompt = Dialogue([Turn("Hi", moss="Hello!"), Turn("a long question " * 10)], META)
    meta_ids = tokenizer.encode(META, add_special_tokens=False)
    ids = tokenize_prompt(prompt, tokenizer, max_length=len(meta_ids) + 5)
    assert len(ids) == len(meta_ids) + 5 and ids[:len(meta_ids)] == meta_ids
    assert tokenizer.decode(ids[len(meta_ids):], clean_up_tokenization_spaces=False).endswith("<eoh>\n<|MOSS|>:")
    with pytest.raises(ValueError, match="prompt"):
        tokenize_prompt(prompt.with_reply("x"), tokenizer, 100)


# --- raw MOSS-003 records, byte for byte ---------------------------------------------------------------------

RAW_META = ("You are an AI assistant whose name is MOSS.\nCapabilities and tools that MOSS can possess.\n"
            "- Inner thoughts: enabled.\n- Web search: enabled. API: Search(query)\n"
            "- Calculator: enabled. API: Calculate(expression)\n- Text-to-image: enabled. API: Text2Image(description)\n")


def raw_turn(human: str, thoughts: str, commands: str, results: str, moss: str) -> dict:
    return {"Human": f"<|Human|>: {human}<eoh>\n", "Inner Thoughts": f"<|Inner Thoughts|>: {thoughts}<eot>\n",
            "Commands": f"<|Commands|>: {commands}<eoc>\n", "Tool Responses": results,
            "MOSS": f"<|MOSS|>: {moss}<eom>\n"}


# One record per plugin style of the public MOSS-003 SFT data, in its shapes (the texts are made up): the calculator
# and the search engine write their Results as a block between newlines, search results numbered `<|1|>:`;
# text-to-image writes them after a space; a tool-less turn writes `None` segments, and a few records write the
# None Results as a block.
RAW_RECORDS = {
    "calculator": {"conversation_id": 1, "category": "calculator", "num_turns": 1, "meta_instruction": RAW_META,
                   "chat": {"turn_1": raw_turn("7乘以8等于多少？", "这是一个计算题，用计算器。", 'Calculate("7*8")',
                                               '<|Results|>:\nCalculate("7*8") => 56\n<eor>\n', "7乘以8等于56。")}},
    "search": {"conversation_id": 2, "category": "web_search", "num_turns": 2, "meta_instruction": RAW_META,
               "chat": {"turn_1": raw_turn("Who wrote Dream of the Red Chamber?", "I should search for it.",
                                           'Search("Dream of the Red Chamber author")',
                                           '<|Results|>:\nSearch("Dream of the Red Chamber author") =>\n'
                                           "<|1|>: 'Cao Xueqin wrote the novel in the 18th century.'\n"
                                           "<|2|>: 'The last 40 chapters are attributed to Gao E.'\n<eor>\n",
                                           "It was written by Cao Xueqin.<sup><|1|></sup>"),
                        "turn_2": raw_turn("Thanks!", "None", "None", "<|Results|>: None<eor>\n",
                                           "You're welcome.")}},
    "text2img": {"conversation_id": 3, "num_turns": 1, "meta_instruction": RAW_META,
                 "chat": {"turn_1": raw_turn("画一只猫", "用户想要一张猫的图片。", 'Text2Image("a cat")',
                                             "<|Results|>: Image generated successfully.<eor>\n", "好的，这是一只猫。")}},
    "tool-less": {"conversation_id": 4, "category": "honest", "num_turns": 2, "meta_instruction": RAW_META,
                  "chat": {"turn_1": raw_turn("Hi", "None", "None", "<|Results|>: None<eor>\n", "Hello!"),
                           "turn_2": raw_turn("Still there?", "None", "None", "<|Results|>:\nNone\n<eor>\n",
                                              "Yes.")}},
}


@pytest.mark.parametrize("style", sorted(RAW_RECORDS))
def test_a_raw_moss_003_record_renders_byte_for_byte(style: str):
    raw = RAW_RECORDS[style]
    d = Dialogue.from_json(raw)
    source = raw["meta_instruction"] + "".join(text for turn in raw["chat"].values() for text in turn.values())
    assert render(d) == render(d, plugin=True) == source
    # Its structured form renders in the data's main convention, which only the rarer forms differ from.
    structured = render(Dialogue.from_json(d.to_json()), plugin=True)
    assert (structured == source) == (style in ("calculator", "search"))


def test_a_raw_prompt_ends_where_the_model_continues():
    d = Dialogue.from_json(RAW_RECORDS["search"])
    assert render(d.as_prompt(plugin=True), plugin=True).endswith("<|Human|>: Thanks!<eoh>\n")
    plain = render(d.as_prompt())
    assert plain.endswith("<|Human|>: Thanks!<eoh>\n<|Inner Thoughts|>: None<eot>\n<|Commands|>: None<eoc>\n"
                          "<|Results|>: None<eor>\n<|MOSS|>:")
    # A new reply renders in the convention; the segments it did not touch keep their source text.
    assert render(d.as_prompt().with_reply("My pleasure.")).endswith("<|MOSS|>: My pleasure.<eom>\n")
    assert render(d.as_prompt().with_reply("My pleasure.")).startswith(render(d)[:render(d).index("Thanks!")])


@pytest.mark.parametrize("plugin", [False, True])
def test_trained_spans_are_the_tokens_the_loss_mask_covers(tokenizer: PreTrainedTokenizerFast, plugin: bool):
    for d in [Dialogue([CALC_TURN, Turn("谢谢", moss="不客气")], META), Dialogue([Turn("Hi", moss="Hello!")], META),
              Dialogue.from_json(RAW_RECORDS["search"]), Dialogue.from_json(RAW_RECORDS["tool-less"])]:
        text, spans = render(d, plugin), trained_spans(d, plugin)
        out = tokenize_dialogue(d, tokenizer, max_length=10_000, plugin=plugin)
        assert masked_spans(tokenizer, out["input_ids"], out["loss_mask"]) == [text[a:b] for a, b in spans]
        assert all(text[b - 5:b] in ("<eom>", "<eoc>") for _, b in spans)
