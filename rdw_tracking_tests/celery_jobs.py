"""Jobs for test_celery.py, importable by celery workers (they rebuild a run's job from
its module and function name): steps that say which process ran them."""

import os
import socket
import time

import dagster as dg

from rdw_tracking import engine


class ProbeConfig(dg.Config):
    sleep_s: float = 0.0


def _where(context: dg.OpExecutionContext, config: ProbeConfig) -> dict:
    time.sleep(config.sleep_s)
    where = {"pid": os.getpid(), "hostname": socket.gethostname()}
    context.log.info(f"step {context.op.name} ran in pid {where['pid']} on {where['hostname']}")
    context.add_output_metadata(where)
    return where


@dg.op
def probe_a(context: dg.OpExecutionContext, config: ProbeConfig) -> dict:
    return _where(context, config)


@dg.op
def probe_b(context: dg.OpExecutionContext, config: ProbeConfig) -> dict:
    return _where(context, config)


@dg.op
def probe_c(context: dg.OpExecutionContext, config: ProbeConfig) -> dict:
    return _where(context, config)


@dg.op
def probe_d(context: dg.OpExecutionContext, config: ProbeConfig, a: dict, b: dict, c: dict):
    """Runs after the other three: reads their outputs, which another worker wrote."""
    assert {a["pid"], b["pid"], c["pid"]}, "upstream outputs loaded"
    return _where(context, config)


def probe_job() -> dg.JobDefinition:
    """Three independent steps, then one that loads all three outputs; on celery, with
    broker and queue from the environment (the test gives each run its own queue)."""

    @dg.job(name="celery_probe", executor_def=engine.celery_executor())
    def celery_probe():
        probe_d(probe_a(), probe_b(), probe_c())

    return celery_probe
