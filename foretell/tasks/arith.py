"""A tiny exact parser for + - * and parentheses over non-negative integers (no eval())."""

from __future__ import annotations

PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def apply(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    raise ValueError(f"unknown operator {op!r}")


def render(op: str, left: str, left_op: str | None, right: str, right_op: str | None) -> str:
    """``left op right`` with only the parentheses that precedence needs."""
    prec = PRECEDENCE[op]
    if left_op is not None and PRECEDENCE[left_op] < prec:
        left = f"({left})"
    if right_op is not None and (
        PRECEDENCE[right_op] < prec or (PRECEDENCE[right_op] == prec and op == "-")
    ):
        right = f"({right})"
    return f"{left}{op}{right}"


def evaluate(expr: str) -> tuple[int, list[int]] | None:
    """(value, the integer literals used in order), or None if ``expr`` is not well formed."""
    pos = 0
    literals: list[int] = []

    def peek() -> str:
        return expr[pos] if pos < len(expr) else ""

    def atom() -> int:
        nonlocal pos
        if peek() == "(":
            pos += 1
            value = sum_()
            if peek() != ")":
                raise ValueError
            pos += 1
            return value
        start = pos
        while peek().isdigit():
            pos += 1
        if start == pos or (pos - start > 1 and expr[start] == "0"):
            raise ValueError
        literals.append(int(expr[start:pos]))
        return literals[-1]

    def product() -> int:
        nonlocal pos
        value = atom()
        while peek() == "*":
            pos += 1
            value *= atom()
        return value

    def sum_() -> int:
        nonlocal pos
        value = product()
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            value = apply(value, op, product())
        return value

    try:
        value = sum_()
    except (ValueError, RecursionError):
        return None
    if pos != len(expr):
        return None
    return value, literals
