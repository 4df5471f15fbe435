"""AWS adapter: jobs on Amazon SQS, run state and coordination in DynamoDB.

Install with ``pip install "flowcraft-py[aws]"``. See ``docs/aws.md``.
"""

from .adapter import SqsAdapter
from .context import DynamoDbContext
from .coordination import DynamoDbCoordinationStore
from .provision import AwsNames, provision_aws
from .reconciler import create_sqs_reconciler

__all__ = [
    "AwsNames",
    "DynamoDbContext",
    "DynamoDbCoordinationStore",
    "SqsAdapter",
    "create_sqs_reconciler",
    "provision_aws",
]
