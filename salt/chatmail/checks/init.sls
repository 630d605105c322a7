{#- The validator every config file.managed runs as its check_cmd. #}
{%- from "chatmail/map.jinja" import chatmail with context %}

chatmail-checks-script:
  file.managed:
    - name: {{ chatmail.paths.check_config }}
    - source: salt://chatmail/files/chatmail-check-config
    - mode: "0755"
    - makedirs: True
