"""The report's "Not finished" section: the stages of a study's plan that have not finished, each named and
never given a figure (its schema: the "unfinished" entry in layerwise.report.document)."""

from __future__ import annotations

from layerwise.report.format import MISSING


def unfinished_section(record, figures) -> list:
    """The plan's stages that have not finished: named, never given a figure."""
    if not record:
        return [("p", MISSING)]
    later = [("p", "Finished after the figures of this report were computed, so not in them either: "
                   + ", ".join(record["finished_after"]) + ".")] if record.get("finished_after") else []
    if not record.get("stages"):
        return [("p", f"Every stage of the plan ({record.get('plan')}) has finished.")] + later
    rows = [[str(s["seed"]), str(s["stage"]), str(s["state"])] for s in record["stages"]]
    return [("p", f"These stages of the plan ({record.get('plan')}) had not finished when this report was "
                  f"written, so no figure of theirs appears in it; the ablation and k-sweep tables say "
                  f"\"not finished\" where one would stand."),
            ("table", ["seed", "stage", "state"], rows)] + later
