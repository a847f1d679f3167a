"""Jobs for test_celery.py, importable by celery workers (they rebuild a run's job from
its module and function name): steps that say which process ran them."""

import os
import socket
import time

import dagster as dg

from rdw_tracking import engine


class ProbeConfig(dg.Config):
    sleep_s: float = 0.0


def _where(context: dg.OpExecutionContext, config: ProbeConfig) -> None:
    time.sleep(config.sleep_s)
    context.log.info(f"step {context.op.name} ran in pid {os.getpid()} on {socket.gethostname()}")


# Ordering only, no values between steps: none of them reads another's local disk,
# which on machines of their own it could not.
@dg.op(out=dg.Out(dg.Nothing))
def probe_a(context: dg.OpExecutionContext, config: ProbeConfig) -> None:
    _where(context, config)


@dg.op(out=dg.Out(dg.Nothing))
def probe_b(context: dg.OpExecutionContext, config: ProbeConfig) -> None:
    _where(context, config)


@dg.op(out=dg.Out(dg.Nothing))
def probe_c(context: dg.OpExecutionContext, config: ProbeConfig) -> None:
    _where(context, config)


@dg.op(ins={name: dg.In(dg.Nothing) for name in ("a", "b", "c")}, out=dg.Out(dg.Nothing))
def probe_d(context: dg.OpExecutionContext, config: ProbeConfig) -> None:
    """Runs once the other three are done."""
    _where(context, config)


def probe_job() -> dg.JobDefinition:
    """Three independent steps, then one after all three; on celery, with broker and
    queue from the environment."""

    @dg.job(name="celery_probe", executor_def=engine.celery_executor())
    def celery_probe():
        probe_d(a=probe_a(), b=probe_b(), c=probe_c())

    return celery_probe


def fleet_verify() -> dg.JobDefinition:
    """The fleet's `verify_execution_tracking` (fleet file and URLs from the environment,
    as a deployment's code location and workers read them), on the executor
    `RDW_EXECUTOR` picks."""
    from rdw_tracking import definitions, fleet

    job = definitions.fleet_databases(fleet.load()).resolve_job_def("verify_execution_tracking")
    return job.with_executor_def(engine.executor(job.executor_def))
