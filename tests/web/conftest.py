def pytest_terminal_summary(terminalreporter):
    """The browser run's figures (accuracy per model, Python vs browser; time), after the results."""
    import sys

    module = sys.modules.get("test_browser")
    figures = dict(getattr(module, "FIGURES", {}))
    if not figures:
        return
    terminalreporter.write_sep("-", f"browser vs Python on the digits test set ({figures.pop('_info', '')}; "
                                    f"{figures.pop('_time', '')})")
    for name, line in figures.items():
        terminalreporter.write_line(f"{name:13s} {line}")
