from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="inference",
    version="0.1.0",
    description="OpenAI-compatible gateway for LM Studio, OpenAI and a built-in mock, on Twisted",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every package under inference/ (a new one is installed without a change here), and the twistd plugin.
    packages=[*find_packages(include=["inference", "inference.*"]), "twisted.plugins"],
    install_requires=[
        "twisted[tls]>=24.7",
        "klein>=24.8",
        "treq>=24.9",
        "pyyaml>=6",
        "opentelemetry-sdk>=1.27",
        "opentelemetry-exporter-otlp>=1.27",
        "prometheus-client>=0.20",
        "orjson>=3.9",
        # Tenants' limits shared by several processes live in Redis: txredisapi is a Twisted client (a blocking
        # one would stall the reactor on every call).
        "txredisapi>=1.4",
    ],
    entry_points={"console_scripts": ["inference = inference.cli:main"]},
    extras_require={
        # hypothesis: property tests of request validation and SSE parsing; schemathesis: fuzzes the running
        # gateway against its own /openapi.json (no 5xx, answers as documented). ruff and mypy (with the
        # zope.interface plugin) are the lint and type gates CI runs before the tests; pinned to a minor version
        # so that a new release's new rules cannot fail a build that changed nothing.
        # openai-agents, langchain-openai and langchain-anthropic: the agent frameworks whose tool loops the
        # tests run unmodified through the gateway (users run them; their requests are what must work).
        # The usage ledger in PostgreSQL (several gateways, one ledger): the driver adbapi runs in its threads.
        "postgres": ["psycopg2-binary>=2.9"],
        "test": ["psycopg2-binary>=2.9", "pytest>=8", "pytest-twisted>=1.14", "openai>=1.40", "anthropic>=0.40",
                 "hypothesis>=6.100", "schemathesis>=4.0", "openai-agents>=0.24", "langchain-openai>=1.7",
                 "langchain-anthropic>=1.7",
                 "ruff~=0.17.6", "mypy~=2.4.1", "mypy-zope~=1.0.17", "types-PyYAML>=6"],
    },
)
