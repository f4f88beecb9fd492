"""Home: what the app is for, this machine's hardware, and where every model's weights come from."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from models.device import hardware_info
from models.registry import REGISTRY
from models.weights import status
from pages._state import run_through_app, user_weight_files, weights_folder

run_through_app()
st.title("ViT Efficiency Lab")
st.markdown(
    "See **why** efficient vision transformers are fast, on your own images and your own hardware: "
    "which tokens DynamicViT drops and ToMe merges, which image and text tokens PuMer prunes in ViLT, "
    "how redundant the heads of multi-head self-attention are next to EfficientViT's cascaded group attention, "
    "which channels a first-order Taylor analysis says deserve width, and what each setting really buys in img/s."
)

st.subheader("Start here")
st.markdown(
    "**Which tokens does a method drop or merge, and what does it cost?** *Token reduction* (DynamicViT, ToMe, "
    "EViT on your images); *Vision-language* (PuMer on ViLT and METER, with your question).  \n"
    "**Where do the speed and the waste come from?** *Head redundancy* and *Channel importance* (what is "
    "redundant); *Live throughput*, *Accuracy vs throughput* and *Where the time goes* (img/s on this machine)."
)

st.subheader("This machine")
info = hardware_info()
st.dataframe(pd.DataFrame({"": list(info), "value": list(info.values())}), hide_index=True)

st.subheader("Weights")
folder = weights_folder()
st.caption(f"Weights folder: {folder or '(none set: VITLAB_WEIGHTS_DIR)'}")
uploads = user_weight_files()
rows = []
for name, spec in REGISTRY.items():
    if name in uploads:  # the sidebar upload is what the pages load for this model
        kind, detail = "uploaded", Path(uploads[name]).name
    else:
        source = status(spec, Path(folder).expanduser() if folder else None)
        kind, detail = source.kind.value, source.location
    rows.append({"model": name, "family": spec.family_label, "weights": kind, "where": detail,
                 "published top-1": spec.top1})
# A static table: every column and row visible, no inner scrollbar.
st.table(pd.DataFrame(rows).set_index("model").style.format({"published top-1": "{:.1f}"}, na_rep=""))
st.caption("'missing' models can still run with random weights (each page has the switch); every figure then says so.")
