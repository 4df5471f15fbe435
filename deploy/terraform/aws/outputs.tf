output "queue_url" {
  description = "SQS_QUEUE_URL for the workers and clients"
  value       = aws_sqs_queue.jobs.url
}

output "dead_letter_queue_url" {
  value = aws_sqs_queue.dead_letter.url
}

output "table_names" {
  description = "FLOWCRAFT_CONTEXT_TABLE, FLOWCRAFT_STATUS_TABLE, FLOWCRAFT_COORDINATION_TABLE"
  value = {
    context      = aws_dynamodb_table.contexts.name
    status       = aws_dynamodb_table.statuses.name
    coordination = aws_dynamodb_table.coordination.name
  }
}

output "worker_policy_arn" {
  description = "Attach to the workers' (and the reconciler's) IAM role"
  value       = aws_iam_policy.worker.arn
}

output "payload_bucket" {
  description = "FLOWCRAFT_PAYLOAD_BUCKET"
  value       = aws_s3_bucket.payloads.bucket
}
