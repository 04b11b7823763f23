"""The printed report of the reliability benchmark: one block per transport, one summary line."""

LABEL_WIDTH = 52
VALUE_WIDTH = 22
GOAL_WIDTH = 20


def verdict(ok):
    return "" if ok is None else ("PASS" if ok else "FAIL")


def render_section(section):
    lines = ["", section.title]
    if section.error:
        lines.append("  FAILED: %s" % section.error)
    for fig in section.figures:
        goal = ("goal " + fig["goal"]) if fig["goal"] is not None else ""
        lines.append(("  %-*s %*s   %-*s %s" % (LABEL_WIDTH, fig["label"], VALUE_WIDTH, fig["text"], GOAL_WIDTH, goal,
                                               verdict(fig["pass"]))).rstrip())
    for table in section.tables:
        lines.extend("  " + line for line in table)
    for note in section.notes:
        lines.append("  - " + note)
    return lines


def render(results):
    """`results`: {transport: [Section, ...]} in run order -> the report text."""
    lines = []
    for transport, sections in results.items():
        lines.append("")
        lines.append("== pplex reliability, %s transport ==" % transport)
        for section in sections:
            lines.extend(render_section(section))
    lines.append("")
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


def summary(results):
    """Counts of goals met and missed, sections that could not run, and what failed."""
    passed = failed = errors = 0
    failures = []
    for transport, sections in results.items():
        for section in sections:
            if section.error:
                errors += 1
                failures.append("%s %s: did not run" % (transport, section.name))
            for fig in section.figures:
                if fig["pass"] is True:
                    passed += 1
                elif fig["pass"] is False:
                    failed += 1
                    failures.append("%s %s: %s" % (transport, section.name, fig["label"]))
    return {"passed": passed, "failed": failed, "errors": errors, "failures": failures}


def summary_line(results):
    s = summary(results)
    total = s["passed"] + s["failed"]
    text = "SUMMARY  %d of %d goals met" % (s["passed"], total)
    if s["errors"]:
        text += ", %d section(s) did not run" % s["errors"]
    if s["failures"]:
        text += "; FAIL: " + "; ".join(s["failures"])
    return text
