"""The method's logic outside torch modules: the CAM-to-mask rule, the metrics (mIoU, boundary F1, m_kc), the dense CRF."""
