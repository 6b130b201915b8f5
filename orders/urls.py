from django.urls import path

from .api import OrderCancelApi, OrderDetailApi, OrderListCreateApi

urlpatterns = [
    path("orders/", OrderListCreateApi.as_view(), name="order-list"),
    path("orders/<int:order_id>/", OrderDetailApi.as_view(), name="order-detail"),
    path("orders/<int:order_id>/cancel/", OrderCancelApi.as_view(), name="order-cancel"),
]
