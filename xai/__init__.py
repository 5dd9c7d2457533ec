"""Explanations: Grad-CAM, SHAP, and their rendering as PNG data URLs and regions."""
