-- The PACS side of the round trip: every radiograph Orthanc stores (Modality CR or DX) is routed
-- to the osteoscreen node, registered in DicomModalities as "osteoscreen". What the node sends back
-- (SR, OT/SC heatmaps, KO) has another modality and stays in Orthanc, so nothing loops.
-- Used by the demo PACS of docker/compose.yaml (docker/orthanc/orthanc.json) and by tests/test_orthanc.py.
function OnStoredInstance(instanceId, tags, metadata, origin)
   local modality = string.upper(tags['Modality'] or '')
   if modality == 'DX' or modality == 'CR' then
      SendToModality(instanceId, 'osteoscreen')
   end
end
