# What flowcraft's AWS workers need: the job queue with a dead-letter queue, the three
# DynamoDB tables, the S3 bucket of the claim check, and a least-privilege IAM policy to
# attach to the workers' role.
# The names and keys are those `flowcraft provision aws` uses, so a stack made here and one
# made by the command are interchangeable.

terraform {
  required_version = ">= 1.3"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

resource "aws_sqs_queue" "dead_letter" {
  name                      = "${var.queue_name}-dlq"
  message_retention_seconds = 1209600 # 14 days, the maximum: time to inspect poison messages
  tags                      = var.tags
}

resource "aws_sqs_queue" "jobs" {
  name = var.queue_name
  # Workers extend a message's visibility while its node runs; this is the first lease.
  visibility_timeout_seconds = var.lease_seconds
  # Workers long-poll for 20 s.
  receive_wait_time_seconds = 20
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter.arn
    # Above the workers' own limit (max_receive_count, 5): they see a poison message first
    # and mark its run failed before SQS moves it.
    maxReceiveCount = var.max_receive_count
  })
  tags = var.tags
}

resource "aws_sqs_queue_redrive_allow_policy" "dead_letter" {
  queue_url = aws_sqs_queue.dead_letter.id
  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.jobs.arn]
  })
}

# One item per run: its context, and the engine's records of the nodes.
resource "aws_dynamodb_table" "contexts" {
  name         = var.context_table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "runId"
  attribute {
    name = "runId"
    type = "S"
  }
  # A finished run's context expires with its status record (retention, 30 days by
  # default). Not `ttl`: a context's keys are its attributes, and `ttl` may be a user's key.
  ttl {
    attribute_name = "_flowcraft.ttl"
    enabled        = true
  }
  point_in_time_recovery {
    enabled = var.point_in_time_recovery
  }
  tags = var.tags
}

# One status record per run. The index lists runs by status, newest first (the Client's
# list_runs, and the reconciler's query for stalled runs); finished runs expire via `ttl`.
resource "aws_dynamodb_table" "statuses" {
  name         = var.status_table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "runId"
  attribute {
    name = "runId"
    type = "S"
  }
  attribute {
    name = "status"
    type = "S"
  }
  attribute {
    name = "lastUpdated"
    type = "S"
  }
  global_secondary_index {
    name            = "status-lastUpdated"
    hash_key        = "status"
    range_key       = "lastUpdated"
    projection_type = "ALL"
  }
  ttl {
    attribute_name = "ttl"
    enabled        = true
  }
  point_in_time_recovery {
    enabled = var.point_in_time_recovery
  }
  tags = var.tags
}

# Small coordination records (any-join arrivals, failure markers), expired through `ttl`.
resource "aws_dynamodb_table" "coordination" {
  name         = var.coordination_table_name
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "key"
  attribute {
    name = "key"
    type = "S"
  }
  ttl {
    attribute_name = "ttl"
    enabled        = true
  }
  tags = var.tags
}

# The claim check: context values too large for a run's item (over 32 KiB of JSON) are
# objects flowcraft/<runId>/<sha256>, and the item holds references to them. They expire
# with the runs (counted from when they were written).
resource "aws_s3_bucket" "payloads" {
  bucket = var.payload_bucket_name
  tags   = var.tags
}

resource "aws_s3_bucket_public_access_block" "payloads" {
  bucket                  = aws_s3_bucket.payloads.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "payloads" {
  bucket = aws_s3_bucket.payloads.id
  rule {
    id     = "flowcraft-payload-expiry"
    status = "Enabled"
    filter {
      prefix = "flowcraft/"
    }
    expiration {
      days = var.payload_expiry_days
    }
  }
}

# Exactly the requests a worker, the reconciler and `flowcraft start` / `status` make.
data "aws_iam_policy_document" "worker" {
  statement {
    sid = "JobQueue"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:SendMessage",
      "sqs:ChangeMessageVisibility",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
    ]
    resources = [aws_sqs_queue.jobs.arn]
  }

  statement {
    sid       = "DeadLetterQueue"
    actions   = ["sqs:GetQueueUrl", "sqs:SendMessage"]
    resources = [aws_sqs_queue.dead_letter.arn]
  }

  statement {
    sid = "RunState"
    actions = [
      "dynamodb:BatchGetItem",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:UpdateItem",
      "dynamodb:DeleteItem",
    ]
    resources = [
      aws_dynamodb_table.contexts.arn,
      aws_dynamodb_table.statuses.arn,
      aws_dynamodb_table.coordination.arn,
    ]
  }

  statement {
    sid       = "ReconcilerScan"
    actions   = ["dynamodb:Scan"]
    resources = [aws_dynamodb_table.statuses.arn]
  }

  statement {
    sid       = "StatusIndex"
    actions   = ["dynamodb:Query"]
    resources = ["${aws_dynamodb_table.statuses.arn}/index/status-lastUpdated"]
  }

  # HeadObject (is a value uploaded already?) is allowed by s3:GetObject.
  statement {
    sid       = "Payloads"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${aws_s3_bucket.payloads.arn}/flowcraft/*"]
  }

  # Without it S3 answers 403 for an object that is not there, not 404: a worker could not
  # tell a missing object from a forbidden one.
  statement {
    sid       = "PayloadsMissing"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.payloads.arn]
  }
}

resource "aws_iam_policy" "worker" {
  name        = "${var.queue_name}-worker"
  description = "flowcraft workers and reconciler: the job queue, the run tables and the payload bucket"
  policy      = data.aws_iam_policy_document.worker.json
  tags        = var.tags
}
