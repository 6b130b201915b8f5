from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from . import selectors, services
from .openapi import (
    BAD_REQUEST, CONFLICT, IDEMPOTENCY_KEY, NOT_FOUND, ORDER_ID, UNAUTHORIZED, UNPROCESSABLE, OrderPageSerializer,
)
from .parsers import BodyTooLarge
from .serializers import OrderCreateSerializer, OrderSerializer


def exception_handler(exc, context):
    """DRF's handler, plus the domain error mapped to its HTTP status, and a body over the size limit to 413."""
    if isinstance(exc, services.OrderError):
        return Response({"detail": str(exc)}, status=exc.status)
    if isinstance(exc, RequestDataTooBig):
        exc = BodyTooLarge(f"request body larger than {settings.API_MAX_BODY_BYTES} bytes")
    return drf_exception_handler(exc, context)


class OrderListCreateApi(APIView):
    @extend_schema(
        operation_id="orders_list",
        summary="The caller's orders, newest first, paginated",
        parameters=[
            OpenApiParameter("customer_id", str, OpenApiParameter.QUERY, description="Only this customer's orders."),
            OpenApiParameter("page", int, OpenApiParameter.QUERY, description="Page number, from 1."),
        ],
        responses={200: OrderPageSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND},
    )
    def get(self, request: Request) -> Response:
        customer_id = request.query_params.get("customer_id")
        orders = selectors.order_list(owner=request.user, customer_id=customer_id)
        paginator = PageNumberPagination()
        page = paginator.paginate_queryset(orders, request, view=self)
        return paginator.get_paginated_response(OrderSerializer(page, many=True).data)

    @extend_schema(
        operation_id="orders_create",
        summary="Create an order (order, items and OrderCreated event in one transaction)",
        parameters=[IDEMPOTENCY_KEY],
        request={"application/json": OrderCreateSerializer},
        responses={
            201: OrderSerializer, 400: BAD_REQUEST, 401: UNAUTHORIZED, 409: CONFLICT, 422: UNPROCESSABLE,
        },
    )
    def post(self, request: Request) -> Response:
        if not isinstance(request.data, dict):
            raise ValidationError({"non_field_errors": ["Expected a JSON object."]})
        serializer = OrderCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data

        def create() -> tuple[int, dict]:
            order = services.order_create(
                owner=request.user,
                customer_id=data["customer_id"],
                items=[services.ItemInput(**item) for item in data["items"]],
            )
            return status.HTTP_201_CREATED, OrderSerializer(selectors.order_get(owner=request.user, order_id=order.pk)).data

        key = request.headers.get("Idempotency-Key")
        if key is None:
            code, body = create()
        else:
            fingerprint = services.request_fingerprint(request.data)
            code, body = services.idempotent_call(owner=request.user, key=key, fingerprint=fingerprint, call=create)
        return Response(body, status=code)


class OrderDetailApi(APIView):
    @extend_schema(
        operation_id="orders_retrieve",
        summary="One of the caller's orders",
        parameters=[ORDER_ID],
        responses={200: OrderSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND},
    )
    def get(self, request: Request, order_id: int) -> Response:
        order = selectors.order_get(owner=request.user, order_id=order_id)
        if order is None:
            return Response({"detail": f"order {order_id} not found"}, status=status.HTTP_404_NOT_FOUND)
        return Response(OrderSerializer(order).data)


class OrderCancelApi(APIView):
    @extend_schema(
        operation_id="orders_cancel",
        summary="Cancel an order (one OrderCancelled event); cancelling again is 409",
        parameters=[ORDER_ID],
        request=None,
        responses={200: OrderSerializer, 401: UNAUTHORIZED, 404: NOT_FOUND, 409: CONFLICT},
    )
    def post(self, request: Request, order_id: int) -> Response:
        services.order_cancel(owner=request.user, order_id=order_id)
        return Response(OrderSerializer(selectors.order_get(owner=request.user, order_id=order_id)).data)
