"""`item broker rabbitmq-user | redis-acl`: a tenant's own broker user, which may write into its queue only.

Each prints what makes the user (rabbitmqctl commands, an `ACL SETUSER` line) and the broker URL the platform's
Celery client then uses; `--apply` runs it, as the deployment's own broker user (ITEM_BROKER_URL). The password is
generated unless given, and shown only here: keep it in the platform's secret store.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Annotated

import typer

from worker.cli.common import fail, in_ledger, settings_from

app = typer.Typer()
broker_app = typer.Typer(
    help="Each tenant's broker user, allowed to write into its own queue only.", no_args_is_help=True
)
app.add_typer(broker_app, name="broker")

TenantArg = Annotated[str, typer.Argument(help="The tenant (`item tenants list`).")]
PasswordOpt = Annotated[
    str | None, typer.Option("--password", help="The user's password (default: a new random one).", show_default=False)
]
UserOpt = Annotated[str | None, typer.Option("--user", help="The user's name (default: item-<tenant>).")]
ApplyOpt = Annotated[bool, typer.Option("--apply", help="Make the user now, not only print how.")]
JsonOut = Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")]


@broker_app.command("rabbitmq-user")
def rabbitmq_user(
    tenant: TenantArg,
    vhost: Annotated[str | None, typer.Option("--vhost", help="Default: ITEM_BROKER_URL's.")] = None,
    user: UserOpt = None,
    password: PasswordOpt = None,
    apply: ApplyOpt = False,
    rabbitmqctl: Annotated[str, typer.Option("--rabbitmqctl", help="The rabbitmqctl to run.")] = "rabbitmqctl",
    as_json: JsonOut = False,
) -> None:
    """A RabbitMQ user that may publish into the tenant's exchange item.checks.<tenant>, and nothing else."""
    from pipeline.core.errors import ItemError
    from worker.intake import broker_access as access
    from worker.intake.queues import queue_name

    tenant = _tenant_id(tenant)
    service_url = _service_url(("amqp://", "amqps://", "pyamqp://"), "an amqp://")
    try:
        grant = access.rabbitmq_grant(tenant, vhost or access.vhost_of(service_url), user)
        secret = password or access.new_password()
        if apply:
            _require_tenant(tenant)
            existed = access.apply_rabbitmq(grant, secret, service_url, rabbitmqctl)
    except ItemError as error:
        raise fail(error) from None
    queue = queue_name(grant.tenant_id)
    shown = {
        "tenant": grant.tenant_id,
        "user": grant.user,
        "vhost": grant.vhost,
        "permissions": dict(zip(("configure", "write", "read"), grant.permissions, strict=True)),
        "exchange": queue,
        "queue": queue,
        "routing_key": queue,
        "broker_url": access.platform_url(service_url, grant.user, secret),
        "commands": [shlex.join(command) for command in grant.commands(secret)],
        "applied": apply,
    }
    if as_json:
        print(json.dumps(shown))
        return
    if apply:
        print(f"{'password changed for' if existed else 'made'} {grant.user}; {queue} declared")
    else:
        print("# on a RabbitMQ node, as its administrator:")
        print("\n".join(shown["commands"]))
        print(f"# the workers declare {queue} (exchange, queue, binding) once they read the tenant")
    _platform_side(shown["broker_url"], queue)


@broker_app.command("redis-acl")
def redis_acl(
    tenant: TenantArg,
    user: UserOpt = None,
    password: PasswordOpt = None,
    apply: ApplyOpt = False,
    as_json: JsonOut = False,
) -> None:
    """A Redis ACL user that may push onto the tenant's list item.checks.<tenant>, and nothing else."""
    from pipeline.core.errors import ItemError
    from worker.intake import broker_access as access
    from worker.intake.broker import transport_options
    from worker.intake.queues import queue_name

    tenant = _tenant_id(tenant)
    service_url = _service_url(("redis://", "rediss://"), "a redis://")
    settings = settings_from()
    secret = password or access.new_password()
    try:
        arguments = access.redis_acl(tenant, secret, settings.redis_key_prefix, user)
        if apply:
            _require_tenant(tenant)
            access.apply_redis(arguments, service_url)
            access.declare_queue(service_url, tenant, transport_options(settings))
    except ItemError as error:
        raise fail(error) from None
    queue = queue_name(tenant)
    shown = {
        "tenant": tenant,
        "user": arguments[0],
        "acl": access.redis_acl_line(arguments),
        "queue": queue,
        "key_prefix": settings.redis_key_prefix,
        "broker_url": access.platform_url(service_url, arguments[0], secret),
        "applied": apply,
    }
    if as_json:
        print(json.dumps(shown))
        return
    if apply:
        print(f"ACL user {arguments[0]} set; {queue} declared")
    else:
        print("# with redis-cli, as a user allowed to run ACL (then ACL SAVE, if users live in an ACL file):")
        print(shown["acl"])
    _platform_side(shown["broker_url"], queue, settings.redis_key_prefix)


def _service_url(schemes: tuple[str, ...], kind: str) -> str:
    url = settings_from().broker_url or ""
    if not url.startswith(schemes):
        from worker.intake.broker_access import BrokerAccessError

        raise fail(BrokerAccessError(f"ITEM_BROKER_URL is not {kind} URL: this command sets up that broker."))
    return url


def _tenant_id(tenant: str) -> str:
    from pipeline.core.errors import ItemError
    from worker.ledger.tenants import checked_id

    try:
        return checked_id(tenant)
    except ItemError as error:
        raise fail(error) from None


def _require_tenant(tenant: str) -> None:
    from worker.ledger.tenants import require_tenant

    in_ledger(lambda session: require_tenant(session, tenant))


def _platform_side(broker_url: str, queue: str, prefix: str = "") -> None:
    """What the platform configures (on stderr: stdout is the commands, for a script to run)."""
    options = f", broker_transport_options {json.dumps({'global_keyprefix': prefix})}" if prefix else ""
    print(f"# the platform's Celery client (README, Tenants):\n#   broker_url = {broker_url}\n#   queue, exchange and "
          f"routing key {queue} (no_declare=True), task_serializer json{options}", file=sys.stderr)  # fmt: skip
