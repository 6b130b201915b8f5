from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from orders.openapi import UNAUTHORIZED

from .openapi import CustomerStatsSerializer
from .selectors import customer_stats_get


class CustomerStatsApi(APIView):
    @extend_schema(
        operation_id="customer_stats_retrieve",
        summary="A customer's figures, built by the event consumer (zeros before any event)",
        parameters=[
            OpenApiParameter(
                "customer_id", {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[^/]+$"},
                OpenApiParameter.PATH, description="The customer id, 1 to 64 characters.",
            ),
        ],
        responses={200: CustomerStatsSerializer, 401: UNAUTHORIZED},
    )
    def get(self, request: Request, customer_id: str) -> Response:
        return Response(customer_stats_get(customer_id=customer_id))
