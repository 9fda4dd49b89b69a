"""The task suite: checkers accept every valid answer and only those; splits are seeded and
disjoint."""

from __future__ import annotations

import itertools
import random

import pytest

from foretell.tasks import (
    ANSWER_START,
    GEN_LENGTH,
    MARKER_POSITION,
    TASKS,
    Example,
    chat_prompt,
    get_task,
    parse_answer,
    render_generation,
)
from foretell.tasks.arith import evaluate


def gen(answer: str, scratch: str = "") -> str:
    return render_generation(scratch, answer)


def test_registry() -> None:
    assert set(TASKS) == {"arrange", "countdown", "permute", "pick", "shuffle", "twosum"}
    assert get_task("countdown") is TASKS["countdown"]
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_samples_fit_the_layout_and_pass_their_own_check(name: str) -> None:
    task = get_task(name)
    rng = random.Random(0)
    for _ in range(2000):
        ex = task.sample(rng)
        text = ex.generation
        assert len(text) <= GEN_LENGTH
        assert text[MARKER_POSITION:ANSWER_START] == "answer: "
        assert text[ANSWER_START:] == ex.answer
        assert task.check(ex, text)
        assert task.check(ex.prompt, text)  # the prompt alone is enough


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generators_are_seeded(name: str) -> None:
    task = get_task(name)
    a = [task.sample(random.Random(7)) for _ in range(3)]
    b = [task.sample(random.Random(7)) for _ in range(3)]
    assert a == b
    assert task.heldout(20, 1) == task.heldout(20, 1)
    assert task.heldout(20, 1) != task.heldout(20, 2)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_heldout_is_disjoint_from_training(name: str) -> None:
    task = get_task(name)
    heldout = task.heldout(100, 1234)
    keys = {task.key(ex.prompt) for ex in heldout}
    assert len(keys) == 100
    stream = task.train_stream(0, keys)
    train = list(itertools.islice(stream, 3000))
    assert not keys & {task.key(ex.prompt) for ex in train}
    assert not {ex.prompt for ex in heldout} & {ex.prompt for ex in train}
    # The filter really removed something: held-out problems do occur in the raw stream.
    rng = random.Random(f"{name}/train/0")
    raw = {task.key(task.sample(rng).prompt) for _ in range(3000)}
    # (twosum's, pick's and permute's problem spaces are too large for a collision in 3000 draws)
    assert raw & keys or name in ("twosum", "pick", "permute")


def test_parse_answer() -> None:
    assert parse_answer("5*7=35,35+3=38  answer: 5*7+3") == "5*7+3"
    assert parse_answer("junk answer: 12 trailing") == "12"
    assert parse_answer("answer: a answer: 3+4") == "3+4"
    assert parse_answer("answer:") == ""
    assert parse_answer("no marker 5*7+3") is None


def test_chat_prompt_matches_the_tokenizer_template() -> None:
    from foretell.models.tokenizer import build_char_tokenizer
    from foretell.tasks import ALPHABET, CHAT_TEMPLATE

    tok = build_char_tokenizer(ALPHABET)
    tok.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "3 5 7>38"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == chat_prompt("3 5 7>38")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.pad_token_id not in ids  # every character is in the alphabet
    assert tok.decode(ids) == text


def test_countdown_checker() -> None:
    task = get_task("countdown")
    ex = Example(prompt="3 5 7>38", answer="5*7+3")
    for valid in ("5*7+3", "3+5*7", "7*5+3", "3+7*5", "(5*7)+3", "3+(7*5)"):
        assert task.check(ex, gen(valid)), valid
    for wrong in (
        "5*7+4",  # a number not given
        "5*7",  # a number left out
        "5*7+3+3",  # a number used twice
        "5*7-3",  # wrong value
        "35+3",  # an intermediate result is not a given number
        "5*7+3)",  # malformed
        "(5*7+3",
        "5**7+3",
        "5*07+3",
        "",
    ):
        assert not task.check(ex, gen(wrong)), wrong
    assert not task.check(ex, "5*7+3")  # no marker
    # Precedence and parentheses are evaluated exactly.
    assert task.check("2 1 4>6", gen("2*(4-1)"))
    assert not task.check("2 1 4>6", gen("2*4-1"))
    assert task.check("9 8 7>8", gen("9-(8-7)"))
    assert task.check("9 8 7>8", gen("9-8+7"))
    assert not task.check("9 8 7>8", gen("9-8-7"))
    # Repeated numbers must be used as often as given.
    assert task.check("4 4 8>36", gen("4+4*8"))
    assert not task.check("4 4 8>36", gen("4*8+4+0"))


def test_countdown_key_ignores_order() -> None:
    task = get_task("countdown")
    assert task.key("3 5 7>38") == task.key("7 3 5>38") != task.key("3 5 7>22")


def test_twosum_checker() -> None:
    task = get_task("twosum")
    prompt = "4 2 7 9 5+11"
    for valid in ("4+7", "7+4"):
        assert task.check(prompt, gen(valid, "11-4=7")), valid
    assert task.check("2 9 5 6 1+11", gen("2+9"))
    assert task.check("2 9 5 6 1+11", gen("5+6"))  # another pair
    for wrong in ("4+8", "2+-9", "4+7+0", "11", "04+7", "4-7", "3+8", ""):
        assert not task.check(prompt, gen(wrong)), wrong
    # A number may not be used twice, even when doubling it hits the target.
    assert not task.check("4 2 7 9 5+14", gen("7+7"))
    assert task.check("4 2 7 9 5+14", gen("9+5"))


def test_shuffle_accepts_every_other_order_and_nothing_else() -> None:
    task = get_task("shuffle")
    prompt = "shuffle dca"
    valid = {"".join(p) for p in itertools.permutations("dca")} - {"dca"}
    assert len(valid) == 5
    for answer in valid:
        assert task.check(prompt, gen(answer, answer)), answer
    # The given order, a repeated letter (what one-step decoding spells), a missing or foreign
    # letter, and no marker are all wrong.
    for wrong in ("dca", "dda", "aac", "dc", "dcab", "dcx", "", "DCA"):
        assert not task.check(prompt, gen(wrong)), wrong
    assert not task.check(prompt, "acd")
    assert task.key("shuffle dca") == task.key("shuffle acd") != task.key("shuffle acb")
    for bad in ("shuffle dd", "shuffle dda", "shuffle abcd", "dca"):
        with pytest.raises(ValueError, match="not a shuffle prompt"):
            task.check(bad, gen("abc"))


def test_shuffle_samples_are_uniform_over_valid_orders() -> None:
    task = get_task("shuffle")
    rng = random.Random(0)
    counts: dict[int, int] = {}
    for _ in range(3000):
        ex = task.sample(rng)
        letters = ex.prompt.split()[1]
        assert ex.scratch == ex.answer != letters and sorted(ex.answer) == sorted(letters)
        pattern = tuple(letters.index(c) for c in ex.answer)
        counts[hash(pattern)] = counts.get(hash(pattern), 0) + 1
    assert len(counts) == 5 and min(counts.values()) > 500  # 600 expected each


def test_arrange_accepts_every_order_including_the_given_one() -> None:
    task = get_task("arrange")
    prompt = "arrange dca"
    for answer in ("".join(p) for p in itertools.permutations("dca")):
        assert task.check(prompt, gen(answer, answer)), answer
    for wrong in ("dda", "dc", "dcab", "dcx", ""):
        assert not task.check(prompt, gen(wrong)), wrong
    with pytest.raises(ValueError, match="not an arrange prompt"):
        task.check("shuffle dca", gen("dca"))


def test_evaluate() -> None:
    assert evaluate("2*(3+4)-5") == (9, [2, 3, 4, 5])
    assert evaluate("10-2-3") == (5, [10, 2, 3])
    for bad in ("", "2+", "(2", "2)", "2 3", "+2", "a"):
        assert evaluate(bad) is None, bad


def test_pick_accepts_every_listed_word_and_nothing_else() -> None:
    task = get_task("pick")
    ex = task.sample(random.Random(3))
    words = ex.prompt.split()[1:]
    assert len(words) == 3 and len(set(words)) == 3 and ex.answer in words
    for word in words:
        assert task.check(ex, f"answer: {word}")
    # A mixture of the listed words, as one-step decoding spells it, is wrong.
    mixed = words[0][:2] + words[1][2:]
    assert mixed in words or not task.check(ex, f"answer: {mixed}")
    assert not task.check(ex, "answer: ")
    assert not task.check(ex, words[0])  # no marker, no answer
    assert task.key("pick ab cd ef") == task.key("pick ef ab cd")


def test_permute_accepts_every_order_of_the_given_letters_and_nothing_else() -> None:
    task = get_task("permute")
    prompt = "permute dcafb="
    for answer in ("".join(p) for p in itertools.permutations("dcafb")):
        assert task.check(prompt, f"answer: {answer}"), answer
    # A repeated letter (what one step per block spells), a letter left out, one too many, a
    # foreign letter, an answer cut short by an early EOS, and no marker are all wrong.
    for wrong in ("dcafd", "dcaf", "dcafbe", "dcafx", "", "DCAFB"):
        assert not task.check(prompt, f"answer: {wrong}"), wrong
    assert not task.check(prompt, "dcafb")
    assert task.key("permute dcafb=") == task.key("permute bfacd=") != task.key("permute dcafe=")
    # Four letters, nine, a repeated one, no closing "=", another task's prompt.
    for bad in (
        "permute dcaf=",
        "permute abcdefghi=",
        "permute aacde=",
        "permute dcafb",
        "arrange dca",
    ):
        with pytest.raises(ValueError, match="not a permute prompt"):
            task.check(bad, "answer: abc")


def test_permute_samples_every_count_and_order() -> None:
    from foretell.tasks.permute import MAX_COUNT, MIN_COUNT

    task = get_task("permute")
    rng = random.Random(0)
    counts: dict[int, int] = {}
    firsts: dict[int, int] = {}
    for _ in range(4000):
        ex = task.sample(rng)
        assert ex.prompt.endswith("=")
        letters = ex.prompt.split()[1][:-1]
        assert len(set(letters)) == len(letters) and sorted(ex.answer) == sorted(letters)
        counts[len(letters)] = counts.get(len(letters), 0) + 1
        index = letters.index(ex.answer[0])
        firsts[index] = firsts.get(index, 0) + 1
    assert sorted(counts) == list(range(MIN_COUNT, MAX_COUNT + 1))
    assert min(counts.values()) > 850  # 1000 expected each
    # The shown order is random: its first letter is any of the given ones, not the first.
    assert len(firsts) == MAX_COUNT and firsts[0] < 1000
