"""Check functions (`module:function`) named by the constitutions in tests/test_checks.py."""


def share_of_vowels(prompt: str, answer: str) -> float:
    """A graded score: the share of the answer's letters that are vowels."""
    letters = [c for c in answer.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


def raises(prompt: str, answer: str) -> float:
    return 1 / 0


def out_of_range(prompt: str, answer: str) -> float:
    return 2.0


def mostly_e(prompt: str, answer: str) -> float:
    """A graded check a tiny random model can learn: 4 x the share of the answer's characters that are 'e',
    capped at 1 (an answer complies when a share of 1/8 or more are)."""
    return min(1.0, 4.0 * answer.count("e") / max(len(answer), 1))
