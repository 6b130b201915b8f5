"""Create the database named in DATABASE_URL if it does not exist (utf8mb4)."""

import os

import dj_database_url
import MySQLdb

config = dj_database_url.parse(os.environ.get("DATABASE_URL", "mysql://root@127.0.0.1:3306/orders"))
connection = MySQLdb.connect(
    host=config["HOST"] or "127.0.0.1", port=int(config["PORT"] or 3306),
    user=config["USER"], password=config["PASSWORD"] or "",
)
name = config["NAME"].replace("`", "``")
connection.cursor().execute(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci")
print(f"database {config['NAME']} ready")
