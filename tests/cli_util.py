"""What the tests of the `lmmrt` command share."""


def assert_one_error_line(err: str):
    """An error reported the CLI's way: one `lmmrt: error:` line on stderr, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmmrt: error: ") and "Traceback" not in err, err
