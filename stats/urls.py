from django.urls import path

from .api import CustomerStatsApi

urlpatterns = [
    path("customers/<str:customer_id>/stats/", CustomerStatsApi.as_view(), name="customer-stats"),
]
