"""Streamlit glue for showing a finished command-line run (``python -m analysis.run``) on a page.

Reading and drawing live in ``analysis.runs.folders`` (``load_run``, ``RunResult.figures``); this file only holds
the widget that asks for the run's folder and reports what is wrong with it.
"""
from __future__ import annotations

import streamlit as st

from analysis.runs.folders import RunFolderError, RunResult, load_run
from pages._state import kept

__all__ = ["RunResult", "load_run", "result_folder_input"]


def result_folder_input(task: str, key: str) -> RunResult | None:
    """A text input for the --out folder of a ``task`` run; the loaded run, or None (empty, or error shown)."""
    folder = kept(
        st.text_input, "Folder of a dataset run (the --out of `python -m analysis.run`)", key=key, default="",
        placeholder="/path/to/run", help=f"Made by `python -m analysis.run {task} --model ... --data ... --out FOLDER` "
                                         "(or under torchrun); it holds run.json and the result files.")
    if not folder or not folder.strip():
        return None
    try:
        result = load_run(folder.strip(), task=task)
    except RunFolderError as exc:
        st.error(str(exc))
        return None
    if result.info.get("model", {}).get("random_weights"):
        st.warning("This run used RANDOM weights: its statistics are those of an untrained network.")
    st.caption(result.summary())
    return result


def dataset_run_section(tasks: list[str], key: str) -> None:
    """An expander that draws a finished dataset-scale run of one of ``tasks`` with the page's own charts."""
    with st.expander("Dataset-scale results from the command line (`python -m analysis.run`)"):
        task = kept(st.radio, "Task", key=f"{key}-task", options=tasks, horizontal=True) if len(tasks) > 1 else tasks[0]
        result = result_folder_input(task, key=f"{key}-folder")
        if result is None:
            st.caption(f"Run `python -m analysis.run {task} --model NAME --data FOLDER --out DIR` (or under "
                       "`torchrun --nproc_per_node N`) over a whole image folder, then give DIR here.")
            return
        for name, figure in result.figures().items():
            st.plotly_chart(figure, key=f"{key}-{name}")
        for path in sorted(p for p in result.folder.iterdir() if p.is_file()):
            st.download_button(f"Download {path.name}", path.read_bytes(), file_name=path.name,
                               key=f"{key}-dl-{path.name}")
