"""A tenant's own broker user, allowed to write into its own queue and nothing else: the broker's access control is
what makes the queue a message arrived on (worker.intake.queues) the identity of its sender.

RabbitMQ (permissions are three regular expressions over exchange and queue names, per vhost):

    configure ^$                    declares nothing: the workers (and `item broker rabbitmq-user --apply`) declare
                                    the tenant's exchange, queue and binding
    write     ^item\\.checks\\.<t>$   publishes into its own exchange only: never `amq.default`, the exchange that
                                    routes to any queue by its name
    read      ^$                    consumes nothing, binds nothing (a binding needs read on its exchange)

Redis (an ACL user): on its own queue's list (and kombu's lists of it by priority) and its exchange's binding
table, under the deployment's key prefix, only what kombu's producer runs to publish (LPUSH, SMEMBERS to route,
and the LLEN and SADD of a client that declares its queue): no other key, no read of a message, no KEYS, FLUSHALL,
CONFIG or pub/sub.

The service's own user keeps every right; these commands need it (rabbitmqctl on a broker node, or `ACL SETUSER`).
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from kombu.utils.url import parse_url

from pipeline.core.errors import ItemError
from worker.intake.queues import queue_name, tenant_queue
from worker.ledger.tenants import checked_id

PRIORITY_SEPARATOR = "\x06\x16"  # kombu's Redis transport: `<queue>\x06\x16<priority>` holds a priority's messages
REDIS_COMMANDS = ("ping", "lpush", "smembers", "llen", "sadd", "multi", "exec", "discard")


class BrokerAccessError(ItemError):
    """A tenant's broker user could not be made as asked. Permanent until the cause is fixed."""

    code = "broker.access"


def user_name(tenant_id: str) -> str:
    return f"item-{checked_id(tenant_id)}"


def new_password() -> str:
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------- RabbitMQ


@dataclass(frozen=True)
class RabbitGrant:
    tenant_id: str
    user: str
    vhost: str

    @property
    def permissions(self) -> tuple[str, str, str]:
        """configure, write, read."""
        return "^$", "^" + queue_name(self.tenant_id).replace(".", r"\.") + "$", "^$"  # ids have no other metacharacter

    def commands(self, password: str) -> list[list[str]]:
        """The rabbitmqctl commands that make the user (run on a broker node, as its administrator)."""
        return [
            ["rabbitmqctl", "add_user", self.user, password],
            ["rabbitmqctl", "set_permissions", "-p", self.vhost, self.user, *self.permissions],
        ]


def rabbitmq_grant(tenant_id: str, vhost: str, user: str | None = None) -> RabbitGrant:
    return RabbitGrant(checked_id(tenant_id), user or user_name(tenant_id), vhost)


def vhost_of(url: str) -> str:
    """The vhost of an amqp:// URL, read by kombu's own parser (so `/%2F` is the default vhost `/`, as kombu
    connects to it; none is `/` too)."""
    return parse_url(url)["virtual_host"] or "/"


def apply_rabbitmq(grant: RabbitGrant, password: str, service_url: str, rabbitmqctl: str = "rabbitmqctl") -> bool:
    """Makes the user (or sets its password, if it exists: True), its permissions, and declares the tenant's
    exchange, queue and binding through `service_url` (the deployment's own user)."""
    if shutil.which(rabbitmqctl) is None:
        raise BrokerAccessError(f"{rabbitmqctl} is not found: run `item broker rabbitmq-user` on a RabbitMQ node.")
    add, permit = grant.commands(password)
    existed = "already exists" in _run([rabbitmqctl, *add[1:]], ok_if="already exists")
    if existed:
        _run([rabbitmqctl, "change_password", grant.user, password])
    _run([rabbitmqctl, *permit[1:]])
    declare_queue(service_url, grant.tenant_id)
    return existed


def _run(command: list[str], ok_if: str | None = None) -> str:
    shown = " ".join(command[:3])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BrokerAccessError(f"`{shown}` failed: {error}") from None
    output = done.stdout + done.stderr
    if done.returncode != 0 and not (ok_if and ok_if in output):
        raise BrokerAccessError(f"`{shown}` failed ({done.returncode}): {output.strip()[-500:]}")
    return output


def declare_queue(service_url: str, tenant_id: str, transport_options: dict | None = None) -> None:
    """The tenant's exchange, queue and binding, declared as the workers declare them."""
    from kombu import Connection

    try:
        with Connection(service_url, transport_options=transport_options or {}, connect_timeout=10) as connection:
            tenant_queue(tenant_id)(connection.default_channel).declare()
    except Exception as error:  # kombu's connection and channel errors have no common base
        raise BrokerAccessError(f"Declaring {queue_name(tenant_id)} failed: {error}") from None


# ---------------------------------------------------------------------- Redis


def redis_acl(tenant_id: str, password: str, prefix: str = "", user: str | None = None) -> list[str]:
    """The arguments of `ACL SETUSER` for the tenant's user: its own keys, only the commands publishing needs."""
    queue = queue_name(checked_id(tenant_id))
    keys = [queue, f"{queue}{PRIORITY_SEPARATOR}*", f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"]
    patterns = [f"~{_glob_escaped(prefix)}{key}" for key in keys]
    commands = [f"+{command}" for command in REDIS_COMMANDS]
    return [user or user_name(tenant_id), "reset", "on", f">{password}", "resetchannels", "-@all", *commands, *patterns]


def redis_acl_line(arguments: list[str]) -> str:
    """`ACL SETUSER ...` as redis-cli reads it (the priority separator written as \\x escapes)."""
    return " ".join(["ACL", "SETUSER", *(_redis_cli_quoted(argument) for argument in arguments)])


def apply_redis(arguments: list[str], service_url: str) -> None:
    import redis

    client = redis.Redis.from_url(service_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        client.execute_command("ACL", "SETUSER", *arguments)
    except redis.RedisError as error:
        raise BrokerAccessError(f"ACL SETUSER {arguments[0]} failed: {error}") from None
    finally:
        client.close()


def _glob_escaped(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _redis_cli_quoted(argument: str) -> str:
    if re.fullmatch(r"[\w.:~+>@|-]+", argument):
        return argument
    escaped = "".join(
        f"\\x{ord(char):02x}" if ord(char) < 32 else "\\" + char if char in '"\\' else char for char in argument
    )
    return f'"{escaped}"'


# ---------------------------------------------------------------------- the platform's side


def platform_url(service_url: str, user: str, password: str) -> str:
    """The service's broker URL with the tenant's user and password in place of the service's."""
    parts = urlsplit(service_url)
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
