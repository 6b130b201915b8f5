from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from rest_framework.authtoken.models import Token


class Command(BaseCommand):
    help = "Development only: ensure an admin user exists and print its API token."

    def add_arguments(self, parser):
        parser.add_argument("--username", default="admin")
        parser.add_argument("--password", default="admin")

    def handle(self, *args, username="admin", password="admin", **options):
        if not settings.DEBUG:
            raise CommandError("refusing to create a dev admin with DJANGO_DEBUG off")
        user, created = get_user_model().objects.get_or_create(
            username=username, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_password(password)
            user.save()
        token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"dev admin: {username} / {password if created else '(unchanged password)'}")
        self.stdout.write(f"API token: {token.key}")
