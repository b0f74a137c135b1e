"""The three HaploOmni training stages (paper section 3.3, appendix A.3): warmup, alignment, unified tuning."""
