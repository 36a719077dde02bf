output "peering_connection_id" {
  description = "The VPC peering connection between the two regions."
  value       = aws_vpc_peering_connection_accepter.this.id
}
