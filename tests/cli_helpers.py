"""Assertions shared by the CLI tests."""


def one_line_error(result, *needles) -> str:
    """A click result that failed the way every bad input must: exit code 2, one line `error: ...` naming the
    problem (each of `needles` in it), no traceback. Returns the line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
