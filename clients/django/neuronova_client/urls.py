"""`path("neuronova/", include("neuronova_client.urls"))`."""

from __future__ import annotations

from django.urls import path

from neuronova_client import views

app_name = "neuronova_client"
urlpatterns = [
    path("ct/", views.classify_ct, name="ct"),
    path("biomarkers/", views.predict_biomarkers, name="biomarkers"),
    path("mri/", views.segment_mri, name="mri"),
    path("predictions/<int:pk>/", views.prediction_detail, name="prediction"),
    path("predictions/<int:pk>/review/", views.review_prediction, name="review"),
]
