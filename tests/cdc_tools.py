"""The CDC tests' own database server: a MariaDB with the binlog on, on its own port and data directory.

The shared server (3306) is never touched: this one is started, restarted and stopped by the tests alone, by its
own pid file. It reports a MySQL 8.0 version string: Debezium's MySQL connector asks a server of version 8.4 or
later (as it reads MariaDB 10.11's) for MySQL 8.4's `SHOW BINARY LOG STATUS`, which MariaDB lacks, and Django takes a
version string naming MariaDB for MariaDB's own numbering (8.0 would be too old). So both see the MySQL 8.0 the
docker-compose stack runs.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timezone

import MySQLdb

from tests.kafka_tools import free_port, wait_for

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"
DATABASE = "orders"  # the connector file's database.include.list
CDC_USER, CDC_PASSWORD = "debezium", "cdc-test-password"
PROJECT = pathlib.Path(__file__).resolve().parent.parent


class BinlogDatabase:
    def __init__(self):
        self.port = free_port()
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="orders-cdc-db-"))
        self.datadir, self.pid_file = self.dir / "data", self.dir / "mariadbd.pid"
        self.url = f"mysql://root@127.0.0.1:{self.port}/{DATABASE}"
        self.process: subprocess.Popen | None = None

    def _user(self) -> list[str]:
        if os.geteuid() != 0:
            return []
        shutil.chown(self.dir, "mysql")  # mariadbd will not run as root
        return ["--user=mysql"]

    def install(self) -> None:
        user = self._user()
        subprocess.run([INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", *user, "--skip-test-db",
                        "--auth-root-authentication-method=normal"], check=True, capture_output=True)
        if user:
            subprocess.run(["chown", "-R", "mysql", str(self.dir)], check=True)
        self.start()
        with self.connect(database="") as db:
            cursor = db.cursor()
            cursor.execute(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4")
            cursor.execute(f"CREATE USER '{CDC_USER}'@'%' IDENTIFIED BY '{CDC_PASSWORD}'")
            # The README's grants: read the binlog, snapshot, keep positions and dead letters in the database.
            cursor.execute(f"GRANT REPLICATION SLAVE, REPLICATION CLIENT, RELOAD, SHOW DATABASES ON *.* "
                           f"TO '{CDC_USER}'@'%'")
            cursor.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE ON {DATABASE}.* TO '{CDC_USER}'@'%'")
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=PROJECT, check=True,
                       env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": self.url})

    def start(self) -> None:
        self.process = subprocess.Popen(
            [MARIADBD, "--no-defaults", *self._user(), f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.dir / 'mariadbd.sock'}", f"--pid-file={self.pid_file}",
             f"--log-bin={self.datadir / 'binlog'}", "--binlog-format=ROW", "--binlog-row-image=FULL",
             "--server-id=1", "--version=8.0.36-log", "--character-set-server=utf8mb4",
             "--collation-server=utf8mb4_general_ci", "--skip-name-resolve", "--innodb-buffer-pool-size=64M",
             f"--log-error={self.dir / 'error.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout=60, interval=0.2, message=f"the binlog MariaDB on port {self.port}")

    def _answers(self) -> bool:
        try:
            self.connect(database="").close()
            return True
        except MySQLdb.OperationalError:
            return False

    def stop(self) -> None:
        """A clean shutdown (SIGTERM to this server's own pid), waited for."""
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
            self.process = None

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self, database: str = DATABASE):
        return MySQLdb.connect(host="127.0.0.1", port=self.port, user="root", database=database,
                               charset="utf8mb4", autocommit=True)

    def env(self) -> dict[str, str]:
        """relay_cdc's connector variables and the app's database, for a subprocess."""
        return {"DATABASE_URL": self.url, "DEBEZIUM_DB_HOST": "127.0.0.1", "DEBEZIUM_DB_PORT": str(self.port),
                "DEBEZIUM_DB_USER": CDC_USER, "DEBEZIUM_DB_PASSWORD": CDC_PASSWORD}

    def reset(self) -> None:
        """No outbox rows, no recorded binlog position: the next relay_cdc starts with a snapshot of nothing."""
        with self.connect() as db:
            cursor = db.cursor()
            cursor.execute("DELETE FROM outbox_failedevent")
            cursor.execute("DELETE FROM outbox_outboxevent")
            cursor.execute("DROP TABLE IF EXISTS debezium_offset_storage")


def outbox_insert(db, *, order_id: str, payload: dict | str | None = None, event_type: str = "OrderCreated",
                  trace_parent: str = "", trace_state: str = "", occurred_at: datetime | None = None) -> str:
    """An outbox row as Django writes it on MySQL (event_id as 32 hex digits, the payload's JSON text as
    json.dumps makes it). Returns the event id, dashed, as the messages carry it."""
    event_id = uuid.uuid4()
    if payload is None:
        payload = {"order_id": order_id, "customer_id": "c-1", "total": "9.99"}
    text = payload if isinstance(payload, str) else json.dumps(payload)
    now = (occurred_at or datetime.now(timezone.utc)).replace(tzinfo=None)
    db.cursor().execute(
        "INSERT INTO outbox_outboxevent (event_id, aggregate_type, aggregate_id, event_type, payload, occurred_at, "
        "status, attempts, available_at, last_error, kafka_partition, kafka_offset, trace_parent, trace_state) "
        "VALUES (%s, 'order', %s, %s, %s, %s, 'pending', 0, %s, '', -1, -1, %s, %s)",
        [event_id.hex, order_id, event_type, text, now, now, trace_parent, trace_state],
    )
    return str(event_id)
