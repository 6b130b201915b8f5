from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .selectors import customer_stats_get


class CustomerStatsApi(APIView):
    def get(self, request: Request, customer_id: str) -> Response:
        return Response(customer_stats_get(customer_id=customer_id))
