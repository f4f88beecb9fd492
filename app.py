"""ViT Efficiency Lab: `streamlit run app.py`."""
from __future__ import annotations

import streamlit as st

from pages._state import APP_RUN_KEY
from pages._sidebar import sidebar

st.set_page_config(page_title="ViT Efficiency Lab", page_icon=":material/speed:", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/token_reduction.py", title="Token reduction (DynamicViT, ToMe)", icon=":material/grid_view:"),
    st.Page("pages/vision_language.py", title="Vision-language (PuMer on ViLT, METER)", icon=":material/chat:"),
    st.Page("pages/head_redundancy.py", title="Head redundancy", icon=":material/hub:"),
    st.Page("pages/channel_importance.py", title="Channel importance", icon=":material/tune:"),
    st.Page("pages/throughput.py", title="Live throughput", icon=":material/speed:"),
    st.Page("pages/frontier.py", title="Accuracy vs throughput", icon=":material/scatter_plot:"),
    st.Page("pages/breakdown.py", title="Where the time goes", icon=":material/donut_small:"),
]

st.session_state[APP_RUN_KEY] = True
navigation = st.navigation(PAGES)
sidebar()
navigation.run()
