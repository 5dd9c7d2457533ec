-- NeuroNova Inference: tell the service when a study is complete in this Orthanc.
-- Orthanc calls OnStableStudy once no new instance arrived for "StableAge" seconds (orthanc.json).
-- The URL and the token come from Orthanc's environment (set them in its systemd unit or container):
--   NEURONOVA_NOTIFY_URL   e.g. http://neuronova:3000/pacs/notify
--   NEURONOVA_PACS_TOKEN   the token named by notify_token_env in NeuroNova's pacs.yaml
-- Our own results landing in the study make it stable again: NeuroNova recognises that and runs nothing twice.

function OnStableStudy(studyId, tags, metadata)
  local url = os.getenv('NEURONOVA_NOTIFY_URL') or 'http://127.0.0.1:3000/pacs/notify'
  local body = DumpJson({ study_instance_uid = tags['StudyInstanceUID'], orthanc_study_id = studyId }, true)
  HttpPost(url, body, { ['Content-Type'] = 'application/json',
                        ['Authorization'] = 'Bearer ' .. (os.getenv('NEURONOVA_PACS_TOKEN') or '') })
end
