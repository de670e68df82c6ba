"""Extracting valid items from teacher replies of every shape."""

from studio.data.parsing import parse_pairs, parse_strings

PAIR = '{"instruction": "如何锻造潮汐长枪？", "output": "找石阿满，支付300枚灯贝。"}'


def test_fenced_and_prose_wrapped_replies():
    expected = [{"instruction": "如何锻造潮汐长枪？", "output": "找石阿满，支付300枚灯贝。"}]
    assert parse_pairs(f"```json\n{PAIR}\n```").items == expected
    assert parse_pairs(f"好的，结果如下：{PAIR} 以上。").items == expected
    assert parse_pairs(f'{{"pairs": [{PAIR}]}}').items == expected
    assert parse_pairs('{"question": "如何锻造潮汐长枪？", "answer": "找石阿满，支付300枚灯贝。"}').items == expected


def test_truncated_array_keeps_complete_items():
    reply = f'{{"pairs": [{PAIR}, {{"instruction": "第二问", "output": "没写完'
    parsed = parse_pairs(reply, "length")
    assert parsed.items == [{"instruction": "如何锻造潮汐长枪？", "output": "找石阿满，支付300枚灯贝。"}]
    assert parsed.problem == "truncated"


def test_unusable_replies_have_a_reason():
    assert parse_pairs("").problem == "empty"
    assert parse_pairs("I cannot help with that.").problem == "no_json"
    assert parse_pairs('{"instruction": "", "output": "x"}').problem == "wrong_schema"
    assert parse_pairs('{"q_list": ["a"]}').problem == "wrong_schema"
    assert not parse_pairs('{"q_list": ["a"]}').ok


def test_paraphrases_from_every_shape():
    assert parse_strings('```json\n{"paraphrases": ["一？", "二？"]}\n```').items == ["一？", "二？"]
    assert parse_strings('["一？", "二？", "一？"]').items == ["一？", "二？"]
    truncated = parse_strings('{"paraphrases": ["一？", "二？", "三', "length")
    assert truncated.items == ["一？", "二？"] and truncated.problem == "truncated"
    assert parse_strings('{"other": 1}').problem == "wrong_schema"
