#!/usr/bin/env bash
# The Airflow example in a real Airflow 3, in one command (tox -e airflow runs the same test):
#
#   examples/airflow/check.sh            # PYTHON=path/to/python of batchrun's virtualenv (default .venv/bin/python)
#
# Runs tests/test_airflow_dag.py: Airflow in a virtualenv of its own (AIRFLOW_VENV, default .airflow-venv, built with
# pip on first use), `airflow db migrate` on SQLite in a temporary AIRFLOW_HOME, then `airflow dags test` of
# examples/airflow/batchrun_dag.py over tiny jobs built offline: two shards retried after exit 75 and 1 and the
# day's output checked, a manifest error failing once without retry, exit 3 failing once with its own message.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PYTHON:-.venv/bin/python}" -m pytest -q -m airflow tests/test_airflow_dag.py "$@"
