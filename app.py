"""ViT Efficiency Lab: `streamlit run app.py`."""
from __future__ import annotations

import streamlit as st

from pages._ui import sidebar

st.set_page_config(page_title="ViT Efficiency Lab", page_icon=":material/speed:", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
]

navigation = st.navigation(PAGES)
sidebar()
navigation.run()
